"""cm-nightly with everything on gs://, against a GCS JSON API server on loopback.

`gcp-storage-emulator` (the test extra; started by the fixture through
tests/gcs_emulator.py, which adds the ifGenerationMatch preconditions it lacks); Beam's GCS
filesystem and the lease's google-cloud-storage client reach it through
STORAGE_EMULATOR_HOST. Pool, model, exclusions and work dir live in the bucket:

* the nightly completes and its batch equals the local run's on the same inputs;
* a run killed inside the select job leaves no complete batch there;
* the lease is exclusive there (ifGenerationMatch=0), a second run refuses.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from apache_beam.io.filesystems import FileSystems

from cm_beam.io import artifacts
from cm_beam.testing import demo_pool
from cm_beam.io import table_io
from cm_beam.nightly import lease as lease_mod
from cm_beam.nightly import work_dir as nw
from pipelines import nightly

# Real cm-nightly runs against a GCS emulator: whole pipelines with TensorFlow.
pytestmark = pytest.mark.slow

BUCKET = "cm-test"
POOL_SIZE = 150
BATCH = 12
FN = ["--runner=FnApiRunner"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    pytest.importorskip("gcp_storage_emulator", reason="the test extra (setup.py) installs gcp-storage-emulator")
    port = _free_port()
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
    proc = subprocess.Popen([sys.executable, launcher, "--port", str(port), "--default-bucket", BUCKET, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",)}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    # No credentials on loopback: Beam connects anonymously at once instead of retrying
    # Application Default Credentials for half a minute.
    from apache_beam.internal.gcp import auth

    creds = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    try:
        yield f"gs://{BUCKET}"
    finally:
        auth._Credentials._credentials_init, auth._Credentials._credentials = creds
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def _upload(local_dir, remote_dir):
    for base, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as src, FileSystems.create(remote_dir + "/" + os.path.relpath(path, local_dir)) as dst:
                dst.write(src.read())


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory):
    local = tmp_path_factory.mktemp("gcs_demo") / "demo"
    made = demo_pool.make_demo_inputs(str(local), POOL_SIZE, seed=5, seed_set_size=60, image_size=32)
    _upload(str(local), f"{gcs}/inputs")
    remote = {k: f"{gcs}/inputs/" + os.path.relpath(made[k], local) for k in ("pool", "model", "labeled")}
    return {"local": made, "remote": remote}


def _argv(pool, model, labeled, work, batch_name):
    return ["--pool", pool, "--model", model, "--exclude", labeled, "--work_dir", work, "--batch_name", batch_name,
            "--pool_format", "manifest", "--image_size", "32", "--batch_size", str(BATCH),
            "--distance_threshold", "0.05", "--seed", "1", "--report", "true"] + FN


def _selection(batch_dir):
    return table_io.read_table(nw.selection_glob(batch_dir)).sort_by("rank").column("example_id").to_pylist()


def test_everything_on_gcs_gives_the_local_batch(gcs, inputs, tmp_path):
    local, remote = inputs["local"], inputs["remote"]
    here = nightly.run(_argv(local["pool"], local["model"], local["labeled"], str(tmp_path / "work"), "day1"))
    there = nightly.run(_argv(remote["pool"], remote["model"], remote["labeled"], f"{gcs}/work", "day1"))
    assert there["status"] == "complete" and there["batch_dir"] == f"{gcs}/work/batches/day1"
    assert there["stages"]["embed"]["output"].startswith(f"{gcs}/work/embeddings/")
    batch = _selection(there["batch_dir"])
    assert len(batch) == BATCH and batch == _selection(here["batch_dir"])
    assert there["counts"] == here["counts"]
    stored = artifacts.read_json(f"{gcs}/work/batches/day1/{nw.NIGHTLY_SUMMARY}")
    assert stored["batch_manifest_sha256"] == nw.batch_manifest_sha256(there["batch_dir"])
    assert stored["batch_dir"] == "batches/day1"
    report = artifacts.read_json(f"{gcs}/work/batches/day1/report/report.json")
    assert report["batch_rows"] == BATCH and report["batch_manifest_sha256"] == stored["batch_manifest_sha256"]
    assert not FileSystems.exists(f"{gcs}/work/{lease_mod.LEASE_NAME}")  # released
    # The next night on gs:// reuses both caches and excludes day1.
    day2 = nightly.run(_argv(remote["pool"], remote["model"], remote["labeled"], f"{gcs}/work", "day2"))
    assert {k: v["status"] for k, v in day2["stages"].items()} == {
        "embed": "cached", "cluster": "cached", "select": "ran", "report": "ran"}
    assert not set(_selection(day2["batch_dir"])) & set(batch)


def test_a_run_killed_inside_the_select_job_leaves_no_complete_batch_on_gcs(gcs, inputs, monkeypatch):
    from cm_beam.selection import stage as select_stage

    remote = inputs["remote"]
    argv = _argv(remote["pool"], remote["model"], remote["labeled"], f"{gcs}/work-killed", "day1")
    monkeypatch.setattr(select_stage._WriteStatsFn, "process", lambda self, stats: (_ for _ in ()).throw(
        RuntimeError("injected failure in cm-select")))
    with pytest.raises(Exception, match="injected failure in cm-select"):
        nightly.run(argv)
    monkeypatch.undo()
    work = nw.WorkDir(f"{gcs}/work-killed")
    assert work.complete_batches() == [] and artifacts.read_manifest(work.batch_dir("day1")) is None
    assert not FileSystems.exists(work.batch_dir("day1") + "/" + nw.NIGHTLY_SUMMARY)
    assert not FileSystems.exists(f"{gcs}/work-killed/{lease_mod.LEASE_NAME}")
    summary = nightly.run(argv)  # the rerun completes from the cached stages
    assert {k: v["status"] for k, v in summary["stages"].items()}["embed"] == "cached"
    assert len(_selection(summary["batch_dir"])) == BATCH


def test_the_lease_is_exclusive_on_gcs(gcs, inputs):
    remote = inputs["remote"]
    root = f"{gcs}/work-leased"
    held = lease_mod.acquire(root, "a", timeout_seconds=60, renew_seconds=0)
    try:
        with pytest.raises(lease_mod.LeaseHeld, match=rf"pid {os.getpid()}"):
            nightly.run(_argv(remote["pool"], remote["model"], remote["labeled"], root, "b"))
        assert FileSystems.match([root + "/**"])[0].metadata_list[0].path == f"{root}/{lease_mod.LEASE_NAME}"
        held.renew()
        held.check()
        # A forced take-over: the old holder learns it lost the lease and must not commit.
        taker = lease_mod.acquire(root, "c", timeout_seconds=60, take_over=True, renew_seconds=0)
        with pytest.raises(lease_mod.LeaseLost):
            held.check()
        # The take-over went through the exclusive marker: a second taker of the same
        # stale lease loses on it.
        assert not lease_mod._store(root).create(f"{root}/{lease_mod.LEASE_NAME}.taken-{held.token}", b"{}")
        taker.release()
    finally:
        held.release()
    assert not FileSystems.exists(f"{root}/{lease_mod.LEASE_NAME}")

