"""Shared test fixtures: Beam options pinned to the FnApiRunner (offline, deterministic)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def beam_args(workers: int = 1):
    """Pipeline flags for the FnApiRunner with `workers` worker processes."""
    args = ["--runner=FnApiRunner"]
    if workers > 1:
        args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return args


DATAFLOW_IMAGE = "us-central1-docker.pkg.dev/cm-beam-dry-run/cm-beam/cm-beam:test"
# Flags that make a stage translate its job for Dataflow without running it.
DATAFLOW_DRY_RUN = [
    "--runner=DataflowRunner", "--dry_run=True", "--project=cm-beam-dry-run", "--region=us-central1",
    "--temp_location=gs://cm-beam-dry-run/tmp", f"--sdk_container_image={DATAFLOW_IMAGE}", "--sdk_location=container",
]


@pytest.fixture
def fnapi_args():
    return beam_args(1)
