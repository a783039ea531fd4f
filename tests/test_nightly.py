"""cm-nightly end to end on a small demo pool (FnApiRunner, in process).

* the --demo command: pool, model, three stages, report, progress lines;
* the following nights: cached embeddings/clusters, earlier batches excluded until
  an --exclude entry names them, a complete batch is not recomputed;
* a new model re-embeds but keeps the clusters; a grown pool's clusters are extended
  by its new examples (cm-cluster --extend, sums recomputed under the new model);
* reliability: a failure injected inside the cluster job, then inside the select
  job, leaves no batch marked complete; the rerun gives the batch of an undisturbed
  run;
* flags fail before any work, naming the flag.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cm_beam.io import artifacts
from cm_beam.testing import demo_pool
from cm_beam.io import table_io
from cm_beam.nightly import work_dir as nw
from cm_beam.errors import InputError
from pipelines import nightly

POOL_SIZE = 240
BATCH = 20
EPS = "0.05"
FN = ["--runner=FnApiRunner"]


def selection(batch_dir):
    table = table_io.read_table(nw.selection_glob(str(batch_dir))).sort_by("rank")
    return table.column("example_id").to_pylist()


def ids_of(csv_path):
    with open(csv_path) as f:
        return [line.strip() for line in f.readlines()[1:] if line.strip()]


@pytest.fixture(scope="module")
def first_night(tmp_path_factory):
    """`cm-nightly --demo` on a 240-image pool: the reference every other test builds on."""
    work = tmp_path_factory.mktemp("nightly") / "work"
    summary = nightly.run(["--demo", "--demo_size", str(POOL_SIZE), "--work_dir", str(work), "--batch_size", str(BATCH),
                           "--batch_name", "day1", "--seed", "3"] + FN)
    demo = nightly.read_demo_info(str(work))
    # The demo inputs as they were (a later test grows the pool in place).
    pristine = tmp_path_factory.mktemp("pristine") / "demo"
    shutil.copytree(work / "demo", pristine)
    return {"work": work, "summary": summary, "demo": demo, "batch": selection(summary["batch_dir"]), "pristine": pristine}


def same_night_flags(first_night):
    """The flags --demo chose, spelled out: the same pool (path), model and stage parameters."""
    demo = first_night["demo"]
    return ["--pool", demo["pool"], "--model", demo["model"], "--pool_format", "manifest", "--image_size", "32",
            "--work_dir", str(first_night["work"]), "--batch_size", str(BATCH), "--exclude", demo["labeled"],
            "--seed", "3"] + FN


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(first_night):
    summary, demo = first_night["summary"], first_night["demo"]
    assert summary["status"] == "complete"
    assert [(k, v["status"]) for k, v in summary["stages"].items()] == [
        ("embed", "ran"), ("cluster", "ran"), ("select", "ran"), ("report", "ran")]
    batch = first_night["batch"]
    assert len(batch) == BATCH == len(set(batch))
    assert not set(batch) & set(ids_of(demo["labeled"]))  # the labeled seed set is excluded
    c = summary["counts"]
    assert c["pool"] == POOL_SIZE and c["excluded"] == demo["seed_set"] and c["selected"] == BATCH
    assert artifacts.read_manifest(summary["batch_dir"])["stage"] == "select"
    # The report: three real PNGs and the numbers behind them.
    for path in summary["report"]["plots"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    numbers = artifacts.read_json(summary["report"]["numbers"])
    assert numbers["pool_rows"] == POOL_SIZE and numbers["batch_rows"] == BATCH
    assert sum(numbers["pool_margin_hist"]) == POOL_SIZE and sum(numbers["batch_margin_hist"]) == BATCH
    assert sum(int(s) * n for s, n in numbers["clusters_by_size"].items()) == numbers["clustered_rows"] == POOL_SIZE
    assert sum(numbers["batch_predicted_classes"].values()) == BATCH == sum(numbers["batch_true_classes"].values())
    # Cluster-Margin's batch is the uncertain end: its median margin is below the pool's.
    centers = np.convolve(numbers["margin_bins"], [0.5, 0.5], "valid")
    median = lambda h: centers[np.searchsorted(np.cumsum(h), sum(h) / 2)]  # noqa: E731
    assert median(numbers["batch_margin_hist"]) < median(numbers["pool_margin_hist"])
    # The summary a person reads next to the batch.
    assert artifacts.read_json(os.path.join(summary["batch_dir"], nw.NIGHTLY_SUMMARY))["batch_name"] == "day1"


@pytest.mark.slow
def test_later_nights_reuse_caches_and_exclude_pending_batches(first_night, capsys):
    work, demo, day1 = first_night["work"], first_night["demo"], first_night["batch"]
    base = same_night_flags(first_night)

    day2 = nightly.run(base + ["--batch_name", "day2"])
    assert {k: v["status"] for k, v in day2["stages"].items()} == {"embed": "cached", "cluster": "cached", "select": "ran"}
    assert day2["auto_excluded_batches"] == ["day1"]
    batch2 = selection(day2["batch_dir"])
    assert len(batch2) == BATCH and not set(batch2) & set(day1)  # no image goes to labelers twice
    assert day2["counts"]["excluded"] == demo["seed_set"] + BATCH
    err = capsys.readouterr().err
    assert "cm-nightly [1/3] embed: cached" in err and "cm-nightly [3/3] select: ran" in err

    # A complete batch is not recomputed (through the command's entry point).
    again = nightly.run(base + ["--batch_name", "day2"])
    assert again["status"] == "already complete" and selection(again["batch_dir"]) == batch2
    capsys.readouterr()
    nightly.main(base + ["--batch_name", "day2"])
    assert "batch already complete" in capsys.readouterr().out

    # day1 was labeled and its directory is now in an --exclude list: only day2 is pending.
    day3 = nightly.run(base + ["--batch_name", "day3", "--exclude", str(work / "batches" / "day1")
                               + "/selection-*.parquet"])
    assert day3["auto_excluded_batches"] == ["day2"]
    batch3 = selection(day3["batch_dir"])
    assert not set(batch3) & (set(day1) | set(batch2) | set(ids_of(demo["labeled"])))


@pytest.mark.slow
def test_failures_leave_no_complete_batch_and_the_rerun_gives_the_same_batch(first_night, tmp_path, monkeypatch, capsys):
    from cm_beam.clustering import build_clusters as cluster_module
    from cm_beam.selection import stage as select_stage

    work = tmp_path / "work"
    shutil.copytree(first_night["pristine"], work / "demo")  # the same inputs, nothing computed
    demo = work / "demo"
    argv = ["--pool", str(demo / "pool" / "pool.csv"), "--model", str(demo / "model.keras"), "--image_size", "32",
            "--pool_format", "manifest",
            "--work_dir", str(work), "--batch_size", str(BATCH), "--exclude", str(demo / "labeled.csv"),
            "--distance_threshold", str(nightly.DEMO_DISTANCE_THRESHOLD), "--seed", "3", "--batch_name", "day1",
            "--progress_seconds", "0.5"] + FN
    layout = nw.WorkDir(str(work))

    # 1. The cluster job dies midway (a worker error inside its Beam pipeline).
    real_merge = cluster_module._merge_points

    def merge_then_die(*args, **kwargs):
        real_merge(*args, **kwargs)
        raise RuntimeError("injected failure in cm-cluster")

    monkeypatch.setattr(cluster_module, "_merge_points", merge_then_die)
    with pytest.raises(Exception, match="injected failure in cm-cluster"):
        nightly.run(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "cm-nightly [2/3] cluster: still running" in err  # progress while a stage's job runs
    time.sleep(1.2)
    assert "still running" not in capsys.readouterr().err  # and the failed stage's heartbeat stopped
    assert layout.complete_batches() == [] and not os.path.exists(layout.batch_dir("day1"))
    assert len(os.listdir(work / "embeddings")) == 1  # the embed stage had finished

    # 2. The rerun dies inside the select job, after the clusters were built.
    monkeypatch.setattr(select_stage._WriteStatsFn, "process", lambda self, stats: (_ for _ in ()).throw(
        RuntimeError("injected failure in cm-select")))
    with pytest.raises(Exception, match="injected failure in cm-select"):
        nightly.run(argv)
    monkeypatch.undo()
    assert layout.complete_batches() == []  # the batch directory exists, but is not complete
    assert artifacts.read_manifest(layout.batch_dir("day1")) is None
    assert layout.incomplete_batches() == [layout.batch_dir("day1")]

    # 3. The rerun reuses what finished and gives the undisturbed run's batch.
    summary = nightly.run(argv)
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"embed": "cached", "cluster": "cached", "select": "ran"}
    assert selection(summary["batch_dir"]) == first_night["batch"]


def test_flags_fail_before_any_work(tmp_path):
    work = tmp_path / "work"
    base = ["--pool", str(tmp_path / "nothing.csv"), "--model", "m.keras", "--work_dir", str(work), "--batch_size", "5"]
    with pytest.raises(InputError, match="--batch_name"):
        nightly.run(base + ["--batch_name", "../escape"])
    with pytest.raises(SystemExit):
        nightly.run(["--work_dir", str(work)])  # no --pool/--model and no --demo
    with pytest.raises(SystemExit):
        nightly.run(base + ["--margin_pool_factor", "0.5"])
    with pytest.raises(InputError, match="--distance_threshold"):
        nightly.run(base)  # no clusters in the work dir yet, so eps is needed
    assert not work.exists()
    args, _ = nightly.build_parser().parse_known_args(base + ["--recluster=false", "--exclude", "a.csv,b.csv",
                                                              "--exclude", "c.csv"])
    assert args.recluster is False


@pytest.mark.slow
def test_main_prints_a_summary_per_stage_and_errors_name_the_flag(first_night, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nightly.main(same_night_flags(first_night) + ["--batch_name", "bad/name"])
    assert exit_info.value.code == 2 and "--batch_name" in capsys.readouterr().err
    nightly.main(same_night_flags(first_night) + ["--batch_name", "printed", "--strategy", "margin"])
    out = capsys.readouterr().out
    for stage in ("embed    cached", "cluster  cached", "select   ran"):
        assert f"cm-nightly: {stage}" in out
    assert f"batch printed: {BATCH} examples" in out
    with pytest.raises(SystemExit) as exit_info:
        nightly.main(["--help"])
    assert exit_info.value.code == 0 and "--distance_threshold" in capsys.readouterr().out


def test_work_dir_helpers():
    assert nw.stage_beam_args(["--job_name", "n", "--x=1"], "embed") == ["--job_name=n-embed", "--x=1"]
    assert nw.stage_beam_args(["--job_name=n"], "select") == ["--job_name=n-select"]
    assert nw.stage_beam_args(["--runner", "DaskRunner"], "cluster") == ["--runner=cm_beam.runtime.dask_runner.DaskRunner"]
    assert nw.stage_beam_args(["--runner=FlinkRunner"], "cluster") == ["--runner=FlinkRunner"]
    assert nw.pool_key("gs://b/pool/*.csv", None) == nw.pool_key("gs://b/pool/*.csv/", None) != nw.pool_key("gs://b/p2/*", None)


# ---------------------------------------------------------------------------
# Integrity: one run per work dir, a complete batch is whole, a work dir can move.

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A real cm-nightly process that takes the lease, then blocks inside its first stage
# until the test lets it go (argv: <started file> <release file> cm-nightly flags...).
HOLDER = """
import os, sys, time
from pipelines import nightly
def blocking_embed(*args, **kwargs):
    open(sys.argv[1], "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    raise RuntimeError("the test stopped this run inside its embed stage")
nightly._embed = blocking_embed
nightly.main(sys.argv[3:])
"""


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start_holder(tmp_path, name, argv):
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    proc = subprocess.Popen([PY, "-c", HOLDER, str(started), str(release)] + argv, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the holder never reached its embed stage"
        time.sleep(0.05)
    return proc, release


def _cli(argv, cwd=None):
    return subprocess.run([PY, "-m", "pipelines.nightly"] + argv, env=_env(), cwd=cwd or ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)


@pytest.mark.slow
def test_a_second_run_on_the_work_dir_refuses_at_once_naming_the_holder(tmp_path):
    """The issue's case: two runs, one work dir, one batch name, batch sizes 200 and 150."""
    import socket

    from cm_beam.nightly import lease

    work = tmp_path / "work"
    base = ["--pool", str(tmp_path / "pool.csv"), "--model", str(tmp_path / "m.keras"), "--work_dir", str(work),
            "--distance_threshold", "0.1", "--batch_name", "same"] + FN
    first, release = _start_holder(tmp_path, "first", base + ["--batch_size", "200"])
    record = artifacts.read_json(str(work / lease.LEASE_NAME))
    assert record["pid"] == first.pid and record["host"] == socket.gethostname() and record["batch_name"] == "same"

    second = _cli(base + ["--batch_size", "150"])
    assert second.returncode == 2, second.stderr
    err = second.stderr
    assert "cm-nightly: error: --work_dir:" in err and "in use by another cm-nightly run" in err
    assert f"host {socket.gethostname()}, pid {first.pid}" in err and f"started {record['started_at']}" in err
    assert "--lease_timeout" in err and "--take_over_lease" in err and "Traceback" not in err
    assert sorted(os.listdir(work)) == [lease.LEASE_NAME]  # the refused run wrote nothing
    assert artifacts.read_json(str(work / lease.LEASE_NAME)) == record  # nor touched the lease

    release.touch()
    first.communicate(timeout=120)
    assert first.returncode != 0  # the blocking stage raised
    assert not (work / lease.LEASE_NAME).exists()  # a failed run releases its lease


@pytest.mark.slow
def test_a_crashed_runs_lease_is_taken_over_after_the_timeout_or_with_the_flag(tmp_path):
    from cm_beam.nightly import lease

    work = tmp_path / "work"
    base = ["--pool", str(tmp_path / "pool.csv"), "--model", str(tmp_path / "m.keras"), "--work_dir", str(work),
            "--distance_threshold", "0.1", "--batch_size", "5"] + FN
    crashed, _ = _start_holder(tmp_path, "crashed", base + ["--batch_name", "a"])
    crashed.send_signal(signal.SIGKILL)  # no finally runs: the lease stays behind
    crashed.communicate(timeout=60)
    stale = artifacts.read_json(str(work / lease.LEASE_NAME))
    assert stale["pid"] == crashed.pid

    refused = _cli(base + ["--batch_name", "b"])  # default timeout (900 s): still looks alive
    assert refused.returncode == 2 and f"pid {crashed.pid}" in refused.stderr

    time.sleep(1.5)  # the dead run renews nothing: after --lease_timeout 1 it is stale
    taker, release = _start_holder(tmp_path, "taker", base + ["--batch_name", "b", "--lease_timeout", "1"])
    record = artifacts.read_json(str(work / lease.LEASE_NAME))
    assert record["pid"] == taker.pid and record["token"] != stale["token"]
    assert (work / f"{lease.LEASE_NAME}.taken-{stale['token']}").exists()
    # While it runs it renews its lease (every timeout/4): a third run with the same
    # timeout still finds it alive.
    time.sleep(1.5)
    third = _cli(base + ["--batch_name", "c", "--lease_timeout", "1"])
    assert third.returncode == 2 and f"pid {taker.pid}" in third.stderr, third.stderr
    taker.send_signal(signal.SIGKILL)
    taker.communicate(timeout=60)
    release.touch()

    # --take_over_lease takes a lease at once, however fresh.
    forced, release = _start_holder(tmp_path, "forced", base + ["--batch_name", "d", "--take_over_lease"])
    err_so_far = artifacts.read_json(str(work / lease.LEASE_NAME))
    assert err_so_far["pid"] == forced.pid
    release.touch()
    _, err = forced.communicate(timeout=120)
    assert f"taking over the lease of host" in err and f"pid {taker.pid}" in err
    assert not (work / lease.LEASE_NAME).exists()


RACER = """
import os, sys, time
from cm_beam.nightly import lease
root, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.001)
try:
    held = lease.acquire(root, "race", timeout_seconds=60, renew_seconds=0)
except lease.LeaseHeld:
    print("refused")
else:
    print("won")
    time.sleep(3)
    held.release()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lease-taken-over"])
def test_of_runs_started_together_exactly_one_gets_the_lease(tmp_path, stale):
    from cm_beam.nightly import lease

    root = tmp_path / "work"
    if stale:  # a dead run's lease (renewed at 1970): every racer finds it stale and tries to take it over
        root.mkdir()
        (root / lease.LEASE_NAME).write_text('{"token": "dead", "renewed_unix": 0, "pid": 1}')
    go = tmp_path / "go"
    procs = [subprocess.Popen([PY, "-c", RACER, str(root), str(go)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(2)  # let every interpreter start and wait on the same file
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert sorted(o.strip() for o, _ in outs) == ["refused", "refused", "refused", "won"], outs
    assert not (root / lease.LEASE_NAME).exists()


@pytest.mark.slow
def test_a_run_killed_in_the_report_step_leaves_no_stale_summary_and_the_rerun_repairs_it(first_night, monkeypatch):
    """The issue's case: --replace_batch with another batch size, killed while plotting."""
    from cm_beam.nightly import report

    base = same_night_flags(first_night) + ["--batch_name", "rep", "--report", "true"]
    first = nightly.run(base)
    batch_dir = first["batch_dir"]
    assert artifacts.read_json(os.path.join(batch_dir, "report", "report.json"))["batch_rows"] == BATCH
    os.makedirs(os.path.join(batch_dir, "beam-temp-selection-deadbeef"))  # a killed job's leftovers
    open(os.path.join(batch_dir, "beam-temp-selection-deadbeef", "part"), "w").close()
    # Stage outputs of runs that died (no manifest): removed once a batch is complete.
    work = first_night["work"]
    dead = [work / "embeddings" / "0000dead", work / "clusters" / os.path.basename(os.path.dirname(first["clusters"])) / "dead"]
    for d in dead:
        os.makedirs(d / "beam-temp-x")
        (d / "embeddings-00000-of-00002.parquet").write_bytes(b"partial")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the report step")

    monkeypatch.setattr(report, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        nightly.run(base + ["--replace_batch", "--batch_size", "10"])
    monkeypatch.undo()
    assert all(d.exists() for d in dead)  # the batch's run did not finish: nothing removed yet
    # The new batch is complete (cm-select's manifest), and nothing of the old one is left
    # beside it: no nightly.json, no report of 20 rows, no beam-temp.
    assert artifacts.read_manifest(batch_dir)["counts"]["selected"] == 10
    assert sorted(f for f in os.listdir(batch_dir) if not f.endswith(".parquet")) == ["manifest.json"]

    repaired = nightly.run(base)
    assert repaired["status"] == "repaired"
    sha = nw.batch_manifest_sha256(batch_dir)
    numbers = artifacts.read_json(os.path.join(batch_dir, "report", "report.json"))
    assert numbers["batch_rows"] == 10 == len(selection(batch_dir)) and numbers["batch_manifest_sha256"] == sha
    stored = artifacts.read_json(os.path.join(batch_dir, nw.NIGHTLY_SUMMARY))
    assert stored["batch_manifest_sha256"] == sha and stored["counts"]["selected"] == 10
    assert stored["embeddings"] == os.path.relpath(first["embeddings"], first_night["work"])
    assert stored["clusters"] == os.path.relpath(first["clusters"], first_night["work"])
    again = nightly.run(base)
    assert again["status"] == "already complete" and again["batch_dir"] == batch_dir
    done = nightly.run(same_night_flags(first_night) + ["--batch_name", "rep2"])
    assert sorted(done["removed_incomplete"]) == sorted(str(d) for d in dead) and not any(d.exists() for d in dead)
    assert os.path.exists(done["embeddings"]) and os.path.exists(done["clusters"])

    # A summary that describes another batch (copied over, or left by an older run) is
    # not trusted either.
    shutil.copy(os.path.join(first_night["summary"]["batch_dir"], nw.NIGHTLY_SUMMARY), os.path.join(batch_dir, nw.NIGHTLY_SUMMARY))
    assert nightly.run(base)["status"] == "repaired"
    assert artifacts.read_json(os.path.join(batch_dir, nw.NIGHTLY_SUMMARY))["batch_manifest_sha256"] == sha


@pytest.mark.slow
def test_work_dir_runs_from_anywhere_and_a_copy_uses_its_own_pool_and_model(first_night, tmp_path, monkeypatch):
    """Run the demo in A (relative --work_dir), move A to B and run from elsewhere as a real
    process, then copy B to C, delete B's inputs, and run C."""
    a = tmp_path / "A"
    shutil.copytree(first_night["pristine"], a / "work" / "demo")  # demo inputs, nothing computed
    monkeypatch.chdir(a)
    demo_flags = ["--demo", "--demo_size", str(POOL_SIZE), "--batch_size", str(BATCH), "--seed", "3"] + FN
    one = nightly.run(demo_flags + ["--work_dir", "work", "--batch_name", "m1"])
    assert one["status"] == "complete" and one["batch_dir"] == str(a / "work" / "batches" / "m1")
    stored = artifacts.read_json(str(a / "work" / "batches" / "m1" / nw.NIGHTLY_SUMMARY))
    assert stored["parameters"]["pool"] == "demo/pool/pool.csv" and stored["parameters"]["model"] == "demo/model.keras"
    assert stored["batch_dir"] == "batches/m1" and stored["parameters"]["work_dir"] == "."

    b = tmp_path / "B" / "moved"
    b.parent.mkdir()
    shutil.move(str(a / "work"), str(b))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    two = _cli(demo_flags + ["--work_dir", str(b), "--batch_name", "m2"], cwd=str(elsewhere))
    assert two.returncode == 0, two.stderr
    stages = artifacts.read_json(str(b / "batches" / "m2" / nw.NIGHTLY_SUMMARY))["stages"]
    assert stages["cluster"]["status"] == "cached"  # the clusters moved with the work dir
    assert f"reusing the pool and model in {b}/demo" in two.stderr
    # The earlier batch is still pending in the moved work dir: excluded automatically.
    assert not set(selection(b / "batches" / "m2")) & set(selection(b / "batches" / "m1"))
    # A successful run prints its progress and summary, not third-party noise.
    for noise in ("I0000", "E0000", "W0000", "Resource module", "Traceback", "absl::InitializeLog"):
        assert noise not in two.stderr + two.stdout, noise
    assert "cm-nightly [3/4] select: ran" in two.stderr and "cm-nightly: batch m2: 20 examples" in two.stdout

    c = tmp_path / "C" / "copy"
    shutil.copytree(b, c)
    shutil.rmtree(b / "demo")  # the original's pool and model are gone: the copy must not need them
    monkeypatch.chdir(elsewhere)
    three = nightly.run(demo_flags + ["--work_dir", str(c), "--batch_name", "m3"])
    assert three["status"] == "complete"
    assert three["parameters"]["pool"] == str(c / "demo" / "pool" / "pool.csv")
    assert three["stages"]["embed"]["output"].startswith(str(c) + "/")
    assert three["auto_excluded_batches"] == ["m1", "m2"]


def test_verbose_shows_third_party_logs_and_the_default_hides_them():
    import logging

    from cm_beam.runtime import runner

    filt = runner._OwnRecordsOnly()
    record = lambda name: logging.LogRecord(name, logging.WARNING, "x.py", 1, "msg", None, None)  # noqa: E731
    assert filt.filter(record("cm_beam.nightly")) and filt.filter(record("pipelines.nightly"))
    assert not filt.filter(record("root")) and not filt.filter(record("apache_beam.runners.worker"))
    assert runner.verbose_requested(["--x", "--verbose"]) and runner.verbose_requested(["--verbose=true"])
    assert not runner.verbose_requested(["--verbose=false"]) and not runner.verbose_requested([])


@pytest.mark.slow
def test_new_model_reembeds_and_grown_pool_extends_the_clusters(first_night, tmp_path):
    """Last in this file: it grows the first night's pool in place (the same --pool, as a real pool grows)."""
    import keras

    work = first_night["work"]
    demo_dir = work / "demo"
    # Tomorrow's model: other weights (a perturbed copy), so another sha256.
    model = keras.models.load_model(str(demo_dir / "model.keras"))
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in model.get_weights()])
    new_model = str(tmp_path / "model-day2.keras")
    model.save(new_model)
    # The pool grew by 30 images (copies under new ids) in the same place.
    manifest = demo_dir / "pool" / "pool.csv"
    rows = manifest.read_text().splitlines()
    added = [f"new-{i:03d}" for i in range(30)]
    extra = [f"{new},{row.split(',')[1]}" for new, row in zip(added, rows[1:31])]
    manifest.write_text("\n".join(rows + extra) + "\n")

    argv = same_night_flags(first_night)
    argv[argv.index("--model") + 1] = new_model
    summary = nightly.run(argv + ["--batch_name", "grown", "--keep_embeddings", "1"])
    stages = summary["stages"]
    assert stages["embed"]["status"] == "ran" and stages["embed"]["output"] != first_night["summary"]["embeddings"]
    # 30 new of 270 (11%) is under --recluster_fraction 0.25: the clusters are extended.
    assert stages["cluster"]["status"] == "extended", stages["cluster"]
    assert stages["cluster"]["extended_from"] == first_night["summary"]["clusters"]
    assert "grew by 30 examples" in stages["cluster"]["decision"] and "recomputed" in stages["cluster"]["decision"]
    assert stages["cluster"]["extension"]["new_examples"] == 30 and stages["cluster"]["extension"]["removed"] == 0
    assert stages["cluster"]["counts"]["points"] == POOL_SIZE + 30
    # Only today's embeddings are kept (--keep_embeddings 1); clusters and batches stay.
    assert summary["pruned_embeddings"] == [first_night["summary"]["embeddings"]]
    assert os.listdir(work / "embeddings") == [os.path.basename(stages["embed"]["output"])]
    c = summary["counts"]
    assert c["pool"] == POOL_SIZE + 30
    # Every example has a cluster now. The new ones are copies of clustered images (same
    # pixels under new ids): most join their original's cluster; a copy whose original's
    # cluster is, under the new model's embeddings, farther than eps from it on average
    # does not (the extension never splits a cluster).
    assert c["unclustered_eligible"] == 0 and c["selected_unclustered"] == 0
    clusters = table_io.read_table(os.path.join(summary["clusters"], "clusters-*.parquet"))
    of = dict(zip(clusters.column("example_id").to_pylist(), clusters.column("cluster_id").to_pylist()))
    originals = [row.split(",")[0] for row in rows[1:31]]
    with_original = sum(of[new] == of[orig] for new, orig in zip(added, originals))
    assert with_original >= 20 and stages["cluster"]["extension"]["joined_existing"] >= with_original

    # A second night on the same pool and model: nothing grew, the extended clustering is reused.
    again = nightly.run(argv + ["--batch_name", "grown-again", "--keep_embeddings", "1"])
    assert again["stages"]["cluster"]["status"] == "cached" and again["clusters"] == summary["clusters"]


def test_report_numbers_equal_a_direct_count(tmp_path):
    """cm_beam.nightly.report's streaming histograms against numpy over the whole tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cm_beam.nightly import report

    rng = np.random.default_rng(1)
    n = 500
    ids = [f"x{i}" for i in range(n)]
    margin = rng.random(n).astype(np.float32)
    predicted = rng.integers(0, 4, n).astype(np.int32)
    cluster = rng.integers(0, 60, n).astype(np.int64)
    sizes = np.bincount(cluster)[cluster]
    for part, rows in enumerate(np.array_split(np.arange(n), 3)):  # three files
        pq.write_table(pa.table({"example_id": [ids[i] for i in rows], "margin": margin[rows],
                                 "predicted_class": predicted[rows]}), str(tmp_path / f"embeddings-{part}.parquet"))
        pq.write_table(pa.table({"example_id": [ids[i] for i in rows], "cluster_id": cluster[rows],
                                 "cluster_size": sizes[rows]}), str(tmp_path / f"clusters-{part}.parquet"))
        pq.write_table(pa.table({"example_id": [ids[i] for i in rows], "cluster_id": cluster[rows]}),
                       str(tmp_path / f"nosize-{part}.parquet"))
    chosen = rng.choice(n, 40, replace=False)
    pq.write_table(pa.table({"example_id": [ids[i] for i in chosen], "margin": margin[chosen],
                             "cluster_id": cluster[chosen]}), str(tmp_path / "selection-0.parquet"))
    expected_sizes = {str(s): int(c) for s, c in zip(*np.unique(np.bincount(cluster)[np.unique(cluster)], return_counts=True))}
    for clusters_glob in ("clusters-*.parquet", "nosize-*.parquet"):  # with and without cluster_size
        numbers = report.collect(str(tmp_path / "embeddings-*.parquet"), str(tmp_path / clusters_glob),
                                 str(tmp_path / "selection-*.parquet"))
        assert numbers["clusters_by_size"] == expected_sizes
        assert numbers["num_clusters"] == len(np.unique(cluster))
    assert numbers["pool_margin_hist"] == np.histogram(margin, report.MARGIN_BINS)[0].tolist()
    assert numbers["batch_margin_hist"] == np.histogram(margin[chosen], report.MARGIN_BINS)[0].tolist()
    assert numbers["pool_predicted_classes"] == {str(c): int(k) for c, k in zip(*np.unique(predicted, return_counts=True))}
    assert numbers["batch_predicted_classes"] == {str(c): int(k) for c, k in
                                                  zip(*np.unique(predicted[chosen], return_counts=True))}
    assert numbers["batch_clusters"] == len(np.unique(cluster[chosen]))
    assert numbers["batch_max_picks_per_cluster"] == int(np.bincount(cluster[chosen]).max())
    paths = report.plot(numbers, str(tmp_path / "plots"))
    assert all(os.path.getsize(p) > 5000 for p in paths)


def test_report_and_summary_show_the_batch_diagnostics(first_night, capsys):
    summary = first_night["summary"]
    diagnostics = artifacts.read_manifest(summary["batch_dir"])["batch_diagnostics"]
    assert diagnostics["picks"] == BATCH == sum(diagnostics["picks_per_pass"])
    assert artifacts.read_json(summary["report"]["numbers"])["batch_diagnostics"] == diagnostics
    assert summary["batch_diagnostics"] == diagnostics
    nightly._print_summary(summary)
    out = capsys.readouterr().out
    assert f"cm-nightly: batch: picks per pass {diagnostics['picks_per_pass']}" in out
    assert f"{diagnostics['clusters_touched']} clusters touched" in out
