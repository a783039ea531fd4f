"""cm-nightly end to end on a small demo pool (FnApiRunner, in process).

* the --demo command: pool, model, three stages, report, progress lines;
* the following nights: cached embeddings/clusters, earlier batches excluded until
  an --exclude entry names them, a complete batch is not recomputed;
* a new model re-embeds but keeps the clusters; a grown pool's new examples are
  singletons, and counted;
* reliability: a failure injected inside the cluster job, then inside the select
  job, leaves no batch marked complete; the rerun gives the batch of an undisturbed
  run;
* flags fail before any work, naming the flag.
"""

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from cm_beam import artifacts, demo_pool, table_io
from cm_beam import nightly as nw
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


def test_failures_leave_no_complete_batch_and_the_rerun_gives_the_same_batch(first_night, tmp_path, monkeypatch, capsys):
    from cm_beam import cluster as cluster_module
    from pipelines import select_batch

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
    monkeypatch.setattr(select_batch._WriteStatsFn, "process", lambda self, stats: (_ for _ in ()).throw(
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
    assert nw.flags_to_argv({"a": 1, "b": True, "c": False, "d": None, "e": ["x", "y"]}) == \
        ["--a", "1", "--b", "--e", "x", "--e", "y"]
    assert nw.stage_beam_args(["--job_name", "n", "--x=1"], "embed") == ["--job_name=n-embed", "--x=1"]
    assert nw.stage_beam_args(["--job_name=n"], "select") == ["--job_name=n-select"]
    assert nw.stage_beam_args(["--runner", "DaskRunner"], "cluster") == ["--runner=cm_beam.dask_runner.DaskRunner"]
    assert nw.stage_beam_args(["--runner=FlinkRunner"], "cluster") == ["--runner=FlinkRunner"]
    assert nw.pool_key("gs://b/pool/*.csv", None) == nw.pool_key("gs://b/pool/*.csv/", None) != nw.pool_key("gs://b/p2/*", None)


def test_new_model_reembeds_and_grown_pool_is_counted_as_singletons(first_night, tmp_path):
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
    assert stages["cluster"]["status"] == "cached" and summary["clusters"] == first_night["summary"]["clusters"]
    # Only today's embeddings are kept (--keep_embeddings 1); clusters and batches stay.
    assert summary["pruned_embeddings"] == [first_night["summary"]["embeddings"]]
    assert os.listdir(work / "embeddings") == [os.path.basename(stages["embed"]["output"])]
    c = summary["counts"]
    assert c["pool"] == POOL_SIZE + 30
    # Eligible examples missing from the cached clusters: exactly the new ones (none is excluded).
    assert c["unclustered_eligible"] == 30
    table = table_io.read_table(nw.selection_glob(summary["batch_dir"]))
    new_in_batch = [i for i, cid in zip(table.column("example_id").to_pylist(), table.column("cluster_id").to_pylist())
                    if i.startswith("new-")]
    assert all(cid < 0 for i, cid in zip(table.column("example_id").to_pylist(), table.column("cluster_id").to_pylist())
               if i.startswith("new-"))  # singletons (synthetic negative ids)
    assert c["selected_unclustered"] == len(new_in_batch)


def test_report_numbers_equal_a_direct_count(tmp_path):
    """cm_beam.report's streaming histograms against numpy over the whole tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cm_beam import report

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
