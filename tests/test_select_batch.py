"""cm-select end to end against the plain reference Cluster-Margin, plus bad input."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm_beam.io import table_io
from cm_beam.errors import InputError
from cm_beam.testing.synthetic_pool import make_pool, write_sharded
from conftest import DATAFLOW_DRY_RUN, beam_args, write_selection_inputs
from pipelines import select_batch
from cm_beam.hashing import hash_ids
from cm_beam.selection.select_impl import TIE_SALT
from reference_cluster_margin import reference_select


def run_select(pool, out, batch_size, workers=1, extra=()):
    argv = ["--scores", pool["scores"], "--batch_size", str(batch_size), "--output_dir", str(out)]
    if pool.get("clusters"):
        argv += ["--clusters", pool["clusters"]]
    for e in pool.get("exclude", []):
        argv += ["--exclude", e]
    manifest = select_batch.run(argv + list(extra) + beam_args(workers))
    table = table_io.read_table(os.path.join(str(out), "selection-*.parquet")).sort_by("rank")
    return manifest, table


def as_rows(table):
    return list(zip(table.column("example_id").to_pylist(), table.column("cluster_id").to_pylist(),
                    table.column("round").to_pylist()))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_selection_inputs(tmp_path_factory.mktemp("select"))


@pytest.mark.parametrize("batch_size,factor,seed", [(100, 10, 0), (250, 4, 7), (40, 10, 3)])
def test_cluster_margin_matches_reference(pool, tmp_path, batch_size, factor, seed):
    manifest, table = run_select(pool, tmp_path / "out", batch_size,
                                 extra=["--margin_pool_factor", str(factor), "--seed", str(seed)])
    expected = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], batch_size,
                                batch_size * factor, seed=seed)
    assert as_rows(table) == expected
    assert table.column("rank").to_pylist() == list(range(batch_size))
    counts = manifest["counts"]
    assert counts["selected"] == batch_size
    assert counts["excluded"] == len(pool["excluded"])
    assert counts["candidates"] == min(batch_size * factor, counts["eligible"])
    assert manifest["rounds"] == max(r for _, _, r in expected) + 1
    hist = manifest["candidate_cluster_size_histogram"]
    assert sum(s * c for s, c in zip(hist["size"], hist["clusters"])) == counts["candidates"]
    assert counts["clusters_touched"] == sum(hist["clusters"])


def test_candidate_set_is_the_reference_margin_pool(pool, tmp_path):
    k_m = 700
    _, table = run_select(pool, tmp_path / "out", k_m, extra=["--margin_pool_size", str(k_m)])
    expected = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], k_m, k_m)
    assert sorted(table.column("example_id").to_pylist()) == sorted(e for e, _, _ in expected)
    assert not set(table.column("example_id").to_pylist()) & set(pool["excluded"])


def test_round_robin_shape_and_smallest_clusters_last_pass(pool, tmp_path):
    batch_size, k_m = 300, 1200
    manifest, table = run_select(pool, tmp_path / "out", batch_size, extra=["--margin_pool_size", str(k_m)])
    full = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], k_m, k_m)
    size_in_m = {}
    for _, c, _ in full:
        size_in_m[c] = size_in_m.get(c, 0) + 1
    picked = {}
    for _, c, _ in as_rows(table):
        picked[c] = picked.get(c, 0) + 1
    last = manifest["rounds"] - 1
    assert last >= 1, "the test pool should need more than one pass"
    # A cluster of size m contributes min(m, R) or min(m, R + 1) examples.
    for c, m in size_in_m.items():
        assert picked.get(c, 0) in (min(m, last), min(m, last + 1))
    # In the last pass, the clusters that got a pick are the smallest (then lowest id).
    eligible_last = sorted((m, c) for c, m in size_in_m.items() if m > last)
    got_last = [(m, c) for m, c in eligible_last if picked.get(c, 0) == last + 1]
    assert got_last == eligible_last[: len(got_last)]
    assert len(got_last) == batch_size - sum(min(m, last) for m in size_in_m.values())


def reference_diagnostics(pool, batch_size, k_m, seed=0, strategy="cluster_margin"):
    """The batch diagnostics by plain numpy on the reference's batch and margin pool."""
    picks = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], batch_size, k_m,
                             seed=seed, strategy=strategy)
    m_pool = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], k_m, k_m, seed=seed,
                              strategy="margin")  # M: the k_m most uncertain, each its own pick
    excluded = set(pool["excluded"])
    eligible = [e for e in pool["score_map"] if e not in excluded]
    priority = np.array([pool["score_map"][e] for e in eligible], dtype=np.float32).astype(np.float64)
    tie = (hash_ids(eligible, seed, TIE_SALT) >> np.uint64(32)).astype(np.float64)
    where = {e: i for i, e in enumerate(eligible)}
    ranks = []
    for e, _, _ in picks:
        i = where[e]
        ranks.append(1 + int(((priority < priority[i]) | ((priority == priority[i]) & (tie < tie[i]))).sum()))
    m_clusters, m_sizes = np.unique([c for _, c, _ in m_pool], return_counts=True)
    size_in_m = dict(zip(m_clusters.tolist(), m_sizes.tolist()))
    pick_clusters, per_cluster = np.unique([c for _, c, _ in picks], return_counts=True)
    return {
        "picks": len(picks),
        "picks_per_pass": np.bincount([r for _, _, r in picks]).tolist(),
        "singleton_share": (float(np.mean([size_in_m[c] == 1 for _, c, _ in picks]))
                            if strategy == "cluster_margin" else None),
        "median_uncertainty_rank": float(np.median(ranks)) if strategy != "random" else None,
        "clusters_touched": int(pick_clusters.size),
        "clusters_with_multiple_picks": int((per_cluster > 1).sum()),
    }


@pytest.mark.parametrize("batch_size,k_m,seed,strategy", [
    (300, 1200, 0, "cluster_margin"), (101, 404, 7, "cluster_margin"), (150, 150, 5, "margin"), (150, 150, 5, "random")])
def test_batch_diagnostics_match_numpy(pool, tmp_path, batch_size, k_m, seed, strategy):
    manifest, _ = run_select(pool, tmp_path / "out", batch_size,
                             extra=["--margin_pool_size", str(k_m), "--seed", str(seed), "--strategy", strategy])
    got = dict(manifest["batch_diagnostics"])
    expected = reference_diagnostics(pool, batch_size, k_m, seed, strategy)
    assert got.pop("margin_pool_size") == (k_m if strategy == "cluster_margin" else batch_size)
    share, want_share = got.pop("singleton_share"), expected.pop("singleton_share")
    assert (share is None) == (want_share is None)
    if want_share is not None:
        assert share == pytest.approx(want_share, abs=1e-6)
    assert got == expected
    if strategy == "cluster_margin":
        # The pool needs several passes and mixes clusters of every kind, so each figure is tested.
        assert len(expected["picks_per_pass"]) > 1 and 0 < want_share < 1
        assert expected["clusters_with_multiple_picks"] > 0


@pytest.mark.slow
def test_batch_diagnostics_with_two_workers(pool, tmp_path):
    manifest, _ = run_select(pool, tmp_path / "out", 300, workers=2, extra=["--margin_pool_size", "1200"])
    expected = reference_diagnostics(pool, 300, 1200)
    got = manifest["batch_diagnostics"]
    assert got["median_uncertainty_rank"] == expected["median_uncertainty_rank"]
    assert got["picks_per_pass"] == expected["picks_per_pass"]


@pytest.mark.parametrize("strategy", ["margin", "random"])
def test_margin_and_random_match_reference(pool, tmp_path, strategy):
    _, table = run_select(pool, tmp_path / "out", 150, extra=["--strategy", strategy, "--seed", "5"])
    expected = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], 150, 150,
                                seed=5, strategy=strategy)
    assert as_rows(table) == expected


@pytest.mark.slow
def test_same_batch_with_one_and_two_workers(pool, tmp_path):
    _, one = run_select(pool, tmp_path / "w1", 200, workers=1, extra=["--seed", "11"])
    _, two = run_select(pool, tmp_path / "w2", 200, workers=2, extra=["--seed", "11"])
    assert one.equals(two)


def test_scores_from_probs_with_entropy(tmp_path):
    rng = np.random.default_rng(9)
    n = 400
    probs = rng.dirichlet(np.full(5, 0.3), size=n).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    ids = [f"p{i:04d}" for i in range(n)]
    d = tmp_path / "probs"
    d.mkdir()
    pq.write_table(pa.table({"example_id": ids, "probs": pa.array(probs.tolist(), pa.list_(pa.float32()))}), str(d / "s.parquet"))
    clusters = (np.arange(n) % 37).astype(np.int64)
    pq.write_table(pa.table({"example_id": ids, "cluster_id": clusters}), str(d / "c.parquet"))
    manifest, table = run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out",
                                 30, extra=["--uncertainty", "entropy", "--margin_pool_size", "120"])
    p64 = probs.astype(np.float64)
    entropy = -(np.where(p64 > 0, p64 * np.log(p64), 0)).sum(axis=1)
    expected = reference_select(dict(zip(ids, np.float32(entropy).tolist())), dict(zip(ids, clusters.tolist())), [],
                                30, 120, larger_is_uncertain=True)
    assert as_rows(table) == expected
    assert manifest["parameters"]["score_source"] == "probs"


def test_invalid_rows_are_rejected_and_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    pq.write_table(pa.table({"example_id": ["a", "b", "c", "d", "e"],
                             "margin": pa.array([0.1, float("nan"), 0.2, 1.5, None], pa.float32())}), str(d / "s.parquet"))
    pq.write_table(pa.table({"example_id": ["a", "c"], "cluster_id": [1, 2]}), str(d / "c.parquet"))
    manifest, table = run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out", 10)
    rejected = table_io.read_table(str(tmp_path / "out" / "rejected-*.parquet")).sort_by("example_id")
    assert rejected.column("example_id").to_pylist() == ["b", "d", "e"]
    reasons = rejected.column("reason").to_pylist()
    assert "NaN" in reasons[0] and "outside" in reasons[1] and "null" in reasons[2]
    assert manifest["counts"]["rejected"] == 3 and manifest["counts"]["pool"] == 5
    # k_t larger than the candidates: all of them, and the manifest says so.
    assert sorted(table.column("example_id").to_pylist()) == ["a", "c"]
    assert manifest["batch_smaller_than_requested"] and manifest["notes"]


def test_unclustered_examples_are_singletons(tmp_path):
    d = tmp_path / "u"
    d.mkdir()
    ids = [f"x{i}" for i in range(20)]
    pq.write_table(pa.table({"example_id": ids, "margin": pa.array(np.linspace(0, 0.5, 20), pa.float32())}), str(d / "s.parquet"))
    # Only the first 10 have clusters: all in one cluster.
    pq.write_table(pa.table({"example_id": ids[:10], "cluster_id": [4] * 10}), str(d / "c.parquet"))
    manifest, table = run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out",
                                 12, extra=["--margin_pool_size", "20"])
    expected = reference_select(dict(zip(ids, np.linspace(0, 0.5, 20, dtype=np.float32).tolist())),
                                {i: 4 for i in ids[:10]}, [], 12, 20)
    assert as_rows(table) == expected
    assert manifest["counts"]["unclustered"] == 10
    # The 10 singletons come first (size 1), then 2 passes... of the big cluster: 1 pick per pass.
    assert sum(1 for _, c, _ in expected if c < 0) == 10


def test_empty_pool_writes_empty_batch_and_manifest(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    pq.write_table(pa.table({"example_id": pa.array([], pa.string()), "margin": pa.array([], pa.float32())}), str(d / "s.parquet"))
    pq.write_table(pa.table({"example_id": pa.array([], pa.string()), "cluster_id": pa.array([], pa.int64())}), str(d / "c.parquet"))
    manifest, table = run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out", 5)
    assert table.num_rows == 0
    assert manifest["counts"]["selected"] == 0 and manifest["counts"]["pool"] == 0
    assert set(table.column_names) >= {"example_id", "cluster_id", "margin", "round", "rank"}


def test_missing_column_fails_before_work_naming_file_and_column(pool, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    pq.write_table(pa.table({"example_id": ["a"], "score": [0.1]}), str(d / "s.parquet"))
    with pytest.raises(InputError, match=r"--scores: .*s\.parquet has neither column 'margin' nor 'probs'"):
        run_select({"scores": str(d / "s.parquet"), "clusters": pool["clusters"]}, tmp_path / "out", 5)
    pq.write_table(pa.table({"example_id": ["a"], "cluster": [1]}), str(d / "c.parquet"))
    with pytest.raises(InputError, match=r"--clusters: .*c\.parquet has no column 'cluster_id'"):
        run_select({"scores": pool["scores"], "clusters": str(d / "c.parquet")}, tmp_path / "out", 5)
    assert not (tmp_path / "out").exists(), "nothing may be written before the inputs are checked"


@pytest.mark.parametrize("which", ["scores", "clusters"])
def test_duplicate_ids_fail_naming_the_id_and_leave_no_manifest(tmp_path, which):
    d = tmp_path / "dup"
    d.mkdir()
    s_ids = ["a", "b", "dupe", "dupe"] if which == "scores" else ["a", "b", "dupe"]
    c_ids = ["a", "dupe", "dupe"] if which == "clusters" else ["a", "dupe"]
    pq.write_table(pa.table({"example_id": s_ids, "margin": pa.array([0.1] * len(s_ids), pa.float32())}), str(d / "s.parquet"))
    pq.write_table(pa.table({"example_id": c_ids, "cluster_id": list(range(len(c_ids)))}), str(d / "c.parquet"))
    with pytest.raises(Exception, match=rf"--{which}: example_id 'dupe' appears 2 times"):
        run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out", 2)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_non_empty_output_dir_is_refused_unless_overwrite(pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(InputError, match="--output_dir: .* is not empty.*--overwrite"):
        run_select(pool, out, 10)
    manifest, table = run_select(pool, out, 10, extra=["--overwrite"])
    assert table.num_rows == 10 and not (out / "old.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 10


def test_invalid_flags_fail_naming_the_flag(pool, tmp_path, capsys):
    for argv, flag in [
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "10", "--margin_pool_size", "5"], "--margin_pool_size"),
        (["--batch_size", "10", "--margin_pool_factor", "0.5"], "--margin_pool_factor"),
        (["--batch_size", "10", "--strategy", "coreset"], "--strategy"),
    ]:
        with pytest.raises(SystemExit):
            select_batch.run(["--scores", pool["scores"], "--clusters", pool["clusters"], "--output_dir", str(tmp_path / "o")] + argv)
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_dataflow_dry_run_builds_the_job_but_writes_no_manifest(pool, tmp_path):
    pytest.importorskip("google.cloud.dataflow_v1beta3")
    from cm_beam.runtime.runner import JobNotExecuted

    out = tmp_path / "out"
    with pytest.raises(JobNotExecuted, match="--dry_run"):
        select_batch.run(["--scores", pool["scores"], "--clusters", pool["clusters"], "--batch_size", "10",
                          "--output_dir", str(out)] + DATAFLOW_DRY_RUN)
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_rows_pruned_before_the_join_are_still_checked_and_counted(tmp_path):
    """The bound that prunes scores before the join must leave the batch and every count
    as without it, even when the exclusions are exactly the most uncertain rows."""
    tables = make_pool(4000, 600, seed=5, margin_decimals=2)
    d = tmp_path / "p"
    scores = write_sharded(tables["scores"], str(d), "scores", num_shards=3, row_group_size=500)
    clusters_table = tables["clusters"]
    ids = tables["scores"].column("example_id").to_pylist()
    margins = tables["scores"].column("margin").to_numpy()
    order = np.argsort(margins, kind="stable")
    # Exclude the 300 most uncertain (so the pool must come from below them) and 100 of
    # the least uncertain (which are pruned: they must still be counted as excluded).
    excluded = sorted({ids[i] for i in order[:300]} | {ids[i] for i in order[-100:]})
    pq.write_table(pa.table({"example_id": excluded}), str(d / "labeled.parquet"))
    # The least uncertain rows lose their cluster rows: pruned *and* unclustered.
    no_cluster = {ids[i] for i in order[-400:-100]}
    keep_rows = [i for i, e in enumerate(clusters_table.column("example_id").to_pylist()) if e not in no_cluster]
    pq.write_table(clusters_table.take(keep_rows), str(d / "clusters.parquet"))
    cluster_map = dict(zip(clusters_table.column("example_id").to_pylist(), clusters_table.column("cluster_id").to_pylist()))
    cluster_map = {k: v for k, v in cluster_map.items() if k not in no_cluster}
    pool = {"scores": scores, "clusters": str(d / "clusters.parquet"), "exclude": [str(d / "labeled.parquet")]}
    manifest, table = run_select(pool, tmp_path / "out", 60, workers=2, extra=["--margin_pool_size", "500", "--seed", "3"])
    expected = reference_select(dict(zip(ids, margins.tolist())), cluster_map, excluded, 60, 500, seed=3)
    assert as_rows(table) == expected
    counts = manifest["counts"]
    excluded_set = set(excluded)
    assert counts["pruned_before_join"] > 2000, "the bound should drop most of this pool before the join"
    assert counts["excluded"] == len(excluded)
    assert counts["eligible"] == len(ids) - len(excluded)
    assert counts["unclustered_eligible"] == sum(1 for e in ids if e not in cluster_map and e not in excluded_set)
    assert counts["candidates"] == 500


def test_duplicate_id_among_pruned_rows_still_fails_naming_it(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    ids = [f"e{i}" for i in range(1000)] + ["late", "late"]
    margins = np.concatenate([np.linspace(0.0, 0.5, 1000), [0.99, 0.98]]).astype(np.float32)
    pq.write_table(pa.table({"example_id": ids, "margin": margins}), str(d / "s.parquet"))
    pq.write_table(pa.table({"example_id": ids[:1000], "cluster_id": list(range(1000))}), str(d / "c.parquet"))
    with pytest.raises(Exception, match=r"--scores: example_id 'late' appears 2 times"):
        run_select({"scores": str(d / "s.parquet"), "clusters": str(d / "c.parquet")}, tmp_path / "out", 5,
                   extra=["--margin_pool_size", "20"])
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("min_block_rows", [250, None])
def test_small_score_blocks_give_the_reference_batch(pool, tmp_path, monkeypatch, min_block_rows):
    """Scores in 37-row blocks (merged within the bundle, at 250 rows or at the default
    65,536, i.e. only when the bundle ends) select the reference batch."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cm_beam.selection import select_impl
    from cm_beam.selection.select_batch import SELECTION_SCHEMA, SelectBatch

    if min_block_rows is not None:
        monkeypatch.setattr(select_impl, "MIN_SCORED_BLOCK_ROWS", min_block_rows)
    scores = table_io.read_table(pool["scores"])
    clusters = table_io.read_table(pool["clusters"], columns=["example_id", "cluster_id"])
    exclude = pa.table({"example_id": pa.array(pool["excluded"], pa.string())})
    out = str(tmp_path / "sel")
    with beam.Pipeline(options=PipelineOptions(beam_args(1))) as p:
        inputs = {"scores": p | "Scores" >> beam.Create(scores.to_batches(max_chunksize=37)),
                  "clusters": p | "Clusters" >> beam.Create(clusters.to_batches(max_chunksize=400)),
                  "exclude": p | "Exclude" >> beam.Create(exclude.to_batches())}
        result = inputs | SelectBatch(batch_size=120, margin_pool_size=900, seed=4)
        result["selection"] | table_io.WriteBlockFiles(out, SELECTION_SCHEMA)
    table = table_io.read_table(out + "-*.parquet").sort_by("rank")
    expected = reference_select(pool["score_map"], pool["cluster_map"], pool["excluded"], 120, 900, seed=4)
    assert as_rows(table) == expected


def test_score_blocks_are_merged_up_to_the_minimum_within_a_bundle():
    from cm_beam.selection.select_impl import SCORED_SCHEMA, ScoreBlockFn

    ids = [f"ex-{i:04d}" for i in range(1000)]
    margins = np.linspace(0.0, 1.0, 1000).astype(np.float32)
    margins[[5, 500]] = np.nan  # rejected rows are reported at once, never buffered
    blocks = pa.table({"example_id": ids, "margin": margins}).to_batches(max_chunksize=64)
    fn = ScoreBlockFn("margin", "margin", min_block_rows=300)
    fn.start_bundle()
    outputs = [o for b in blocks for o in fn.process(b)]
    scored = [o for o in outputs if not hasattr(o, "tag")]
    rejected = [o.value for o in outputs if getattr(o, "tag", None) == ScoreBlockFn.REJECTED]
    tail = [w.value for w in fn.finish_bundle()]
    # 64-row blocks, flushed at >= 300 rows: rows 0-319 less row 5, 320-639 less row 500, 640-959.
    assert [b.num_rows for b in scored] == [319, 319, 320] and [b.num_rows for b in tail] == [40]
    merged = pa.Table.from_batches(scored + tail, schema=SCORED_SCHEMA)
    kept = [i for i in range(1000) if i not in (5, 500)]
    assert merged.column("example_id").to_pylist() == [ids[i] for i in kept]
    assert merged.column("score").to_pylist() == margins[kept].tolist()
    assert sum(b.num_rows for b in rejected) == 2
    fn.start_bundle()  # nothing carries over to the next bundle
    assert list(fn.finish_bundle()) == []
