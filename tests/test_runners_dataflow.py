"""Each stage translates for Dataflow: `--runner=DataflowRunner --dry_run=True`.

The DataflowRunner validates the options, builds the runner-v2 job (the portable
pipeline proto with the custom SDK container as its environment) and returns DONE
without credentials or a network call. The stages write their manifest when a run
is DONE, so the test stops each stage right after its pipeline translated (a
patched `Pipeline.run` that records the result and raises): nothing is recorded
as finished. cm-nightly itself refuses --dry_run (it would chain stages whose
outputs do not exist).
"""

import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm_beam.io import artifacts
from cm_beam.errors import InputError
from conftest import DATAFLOW_DRY_RUN, DATAFLOW_IMAGE

# Dataflow dry runs: each stage's job translated for Dataflow.
pytestmark = pytest.mark.slow

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")
pytest.importorskip("google.cloud.dataflow_v1beta3")

IMAGE = DATAFLOW_IMAGE
DATAFLOW = DATAFLOW_DRY_RUN


class _Translated(Exception):
    pass


@pytest.fixture
def translate(monkeypatch):
    """Runs a stage's `run(argv)` up to its pipeline's translation; returns the result."""
    captured = []
    original = beam.Pipeline.run

    def run_and_stop(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        captured.append(result)
        raise _Translated()

    monkeypatch.setattr(beam.Pipeline, "run", run_and_stop)

    def go(stage_run, argv, output_dir):
        with pytest.raises(_Translated):
            stage_run(argv + DATAFLOW)
        assert artifacts.read_manifest(output_dir) is None  # nothing marked complete
        (result,) = captured[-1:]
        assert result.state == "DONE"
        pipeline = result.job.proto_pipeline
        names = {t.unique_name for t in pipeline.components.transforms.values()}
        envs = [e.payload for e in pipeline.components.environments.values()]
        assert envs and all(IMAGE.encode() in p for p in envs), "every step runs in the custom SDK container"
        return names

    return go


def _has(names, *wanted):
    for w in wanted:
        assert any(n == w or n.startswith(w + "/") for n in names), f"{w} not in the translated job"


def test_cm_embed_translates_for_dataflow(translate, tmp_path):
    from cm_beam.testing import demo_pool
    from pipelines import embed_pool

    info = demo_pool.make_pool(str(tmp_path / "pool"), 12, seed=0)
    model = str(tmp_path / "model.keras")
    demo_pool.build_model(len(demo_pool.CLASSES)).save(model)  # untrained: only the contract matters here
    out = str(tmp_path / "emb")
    names = translate(embed_pool.run, ["--pool", info["manifest"], "--model", model, "--image_size", "32",
                                       "--output_dir", out], out)
    _has(names, "ReadPool", "EmbedAndScore", "WriteEmbeddings", "WriteRejected")


def test_cm_cluster_translates_for_dataflow(translate, tmp_path):
    from pipelines import build_clusters

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    path = str(tmp_path / "embeddings.parquet")
    pq.write_table(pa.table({"example_id": [f"e{i}" for i in range(50)],
                             "embedding": pa.array(list(emb), pa.list_(pa.float32()))}), path)
    out = str(tmp_path / "clusters")
    names = translate(build_clusters.run, ["--embeddings", path, "--distance_threshold", "0.3", "--output_dir", out], out)
    _has(names, "ReadEmbeddings", "BuildClusters", "WriteClusters", "WriteRejected")


def test_cm_select_translates_for_dataflow(translate, tmp_path):
    from pipelines import select_batch

    ids = [f"e{i}" for i in range(50)]
    scores, clusters = str(tmp_path / "scores.parquet"), str(tmp_path / "clusters.parquet")
    pq.write_table(pa.table({"example_id": ids, "margin": pa.array(np.linspace(0, 1, 50), pa.float32())}), scores)
    pq.write_table(pa.table({"example_id": ids, "cluster_id": pa.array(np.arange(50) // 5, pa.int64())}), clusters)
    out = str(tmp_path / "batch")
    names = translate(select_batch.run, ["--scores", scores, "--clusters", clusters, "--batch_size", "5",
                                         "--output_dir", out], out)
    _has(names, "ReadScores", "ReadClusters", "SelectBatch", "WriteSelection", "WriteRejected")


def test_cm_nightly_refuses_a_dry_run(tmp_path):
    from pipelines import nightly

    with pytest.raises(InputError, match="--dry_run"):
        nightly.run(["--pool", "p", "--model", "m.keras", "--work_dir", str(tmp_path), "--batch_size", "5"] + DATAFLOW)
    with pytest.raises(InputError, match="--template_location"):
        nightly.run(["--pool", "p", "--model", "m.keras", "--work_dir", str(tmp_path), "--batch_size", "5",
                     "--template_location=gs://b/t.json"])
    assert not os.listdir(tmp_path)  # refused before any work
