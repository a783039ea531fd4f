"""cm-cluster's merge hierarchy end to end: merges-*.parquet, cuts by distance, target
mean size and cluster count, and --recut_from, against scipy and direct runs."""

import os

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import cdist

from cm_beam.io import artifacts
from cm_beam.io import table_io
from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.clustering.hierarchy import batch_to_merges
from cm_beam.clustering import knn_kernels as kk
from cm_beam.errors import InputError
from pipelines import build_clusters
from tests.conftest import beam_args, write_embeddings as write_pool
from tests.test_build_clusters import blobs, ids_for, read_labels, scipy_reference
from tests.test_hac_kernels import gap_thresholds, same_partition


def run(*flags, workers=1):
    return build_clusters.run([str(f) for f in flags] + beam_args(workers))


def read_merges(out_dir):
    t = table_io.read_table(os.path.join(str(out_dir), "merges-*.parquet"))
    assert [f.name for f in t.schema] == ["cluster_a", "cluster_b", "merged", "height", "size", "round"]
    assert [str(f.type) for f in t.schema][:5] == ["int64", "int64", "int64", "double", "int64"]
    return batch_to_merges(t.combine_chunks().to_batches()[0]) if t.num_rows else hik.Merges.empty()


def read_leaves(out_dir, ids):
    t = table_io.read_table(os.path.join(str(out_dir), "clusters-*.parquet"))
    leaf = dict(zip(t.column("example_id").to_pylist(), t.column("leaf_id").to_pylist()))
    return np.array([leaf[i] for i in ids], np.int64)


def read_rows(out_dir):
    t = table_io.read_table(os.path.join(str(out_dir), "clusters-*.parquet"))
    return sorted(zip(*[t.column(c).to_pylist() for c in ("example_id", "cluster_id", "cluster_size", "leaf_id")]))


@pytest.mark.slow
def test_exact_hierarchy_cuts_equal_scipy_and_the_merge_table_is_consistent(tmp_path):
    """k = n - 1: ONE clustering (with distributed rounds, then the in-memory finish), cut
    at several eps' by --recut_from and by the kernels, equals fcluster at each eps'."""
    x = blobs(600, d=12, k=12, spread=0.35, seed=11)
    n = len(x)
    ids = ids_for(n)
    pattern = write_pool(str(tmp_path / "in"), x, ids)
    z = scipy_reference(x, "cosine")
    cuts = gap_thresholds(z[:, 2], [0.03, 0.08, 0.15, 0.3, 0.5])
    top = gap_thresholds(z[:, 2], [0.7])[0]
    src = tmp_path / "hier"
    m = run("--embeddings", pattern, "--output_dir", src, "--distance_threshold", top, "--num_neighbors", n - 1,
            "--knn_mode", "exact", "--num_shards", 3, "--max_rounds", 3, "--max_inmemory_edges", 40_000)
    assert len(m["beam_rounds"]) >= 1 and m["inmemory_rounds"]
    assert m["max_distance"] == top and m["cut"]["rule"] == "distance" and m["cut"]["source"] is None
    merges = read_merges(src)
    leaves = read_leaves(src, ids)
    assert same_partition(read_labels(str(src), ids)[0], fcluster(z, top, "distance"))
    # The table: one row per merge, sizes add up, a < b, merged == a, heights = numpy's
    # average linkage of the two children's members (replayed in round order).
    assert len(merges) == n - m["clusters"] == m["hierarchy"]["merges"]
    xn = kk.normalise_rows(x.astype(np.float64))[0]
    pos = {int(l): i for i, l in enumerate(leaves)}
    members = {int(l): [i] for i, l in enumerate(leaves)}
    for k in np.argsort(merges.round, kind="stable"):
        a, b = members[int(merges.a[k])], members.pop(int(merges.b[k]))
        assert len(a) + len(b) == merges.size[k]
        want = cdist(xn[a], xn[b], "cosine").mean()
        assert abs(merges.height[k] - want) < 1e-6, (k, merges.height[k], want)
        members[int(merges.a[k])] = a + b
    assert all(min(leaves[v]) == key for key, v in members.items())
    # Beam rounds' merges first, then the finish's, numbered after them.
    assert merges.round.min() == 0 and merges.round.max() >= len(m["beam_rounds"])
    assert set(np.unique(merges.round[merges.round < len(m["beam_rounds"])]).tolist()) == set(
        range(len(m["beam_rounds"])))
    assert np.array_equal(hik.monotone_heights(merges), merges.height), "exact HAC is monotone"
    np.testing.assert_allclose(np.sort(merges.height), np.sort(z[:, 2][z[:, 2] <= top]), atol=1e-6)
    assert len(pos) == n  # leaf ids are unique
    for eps in cuts:
        ref = fcluster(z, eps, "distance")
        labels, sizes = hik.relabel(leaves, hik.cut_table(merges, merges.height, eps))
        assert same_partition(labels, ref), eps
        assert n - len(np.unique(ref)) == int((merges.height <= eps).sum())
    for eps in (cuts[1], cuts[3]):  # through the command
        out = tmp_path / f"recut-{eps:.4f}"
        r = run("--recut_from", src, "--output_dir", out, "--distance_threshold", eps)
        got, sizes = read_labels(str(out), ids)
        ref = fcluster(z, eps, "distance")
        assert same_partition(got, ref) and np.array_equal(sizes, np.bincount(ref)[ref])
        assert r["cut"] == {"source": str(src), "rule": "distance", "requested": eps, "distance_threshold": eps,
                            "num_clusters": len(np.unique(ref)), "mean_cluster_size": n / len(np.unique(ref))}
        assert artifacts.read_manifest(str(out))["cut"] == r["cut"]
        assert r["num_clusters"] == r["clusters"] == len(np.unique(ref)) and r["distance_threshold"] == eps
        assert len(read_merges(out)) == len(merges)  # the full hierarchy, to cut again
        assert sum(r["size_histogram"].values()) == r["clusters"]


@pytest.mark.slow
def test_recut_equals_direct_runs_with_default_k(tmp_path):
    """Default k: a re-cut at eps' of a clustering at eps equals a cm-cluster run at eps',
    partition for partition and id for id; a re-cut at eps gives back the same files."""
    x = blobs(1200, d=16, k=40, spread=0.3, seed=12)
    ids = ids_for(len(x))
    pattern = write_pool(str(tmp_path / "in"), x, ids)
    z = scipy_reference(x, "cosine")
    small, mid, top = gap_thresholds(z[:, 2], [0.08, 0.2, 0.45])
    src = tmp_path / "top"
    run("--embeddings", pattern, "--output_dir", src, "--distance_threshold", top,
        "--max_rounds", 4, "--max_inmemory_edges", 20_000)
    same = tmp_path / "same"
    run("--recut_from", src, "--output_dir", same, "--distance_threshold", top)
    assert read_rows(same) == read_rows(src)
    for eps in (small, mid):
        direct, recut = tmp_path / f"direct-{eps:.4f}", tmp_path / f"recut-{eps:.4f}"
        md = run("--embeddings", pattern, "--output_dir", direct, "--distance_threshold", eps)
        mr = run("--recut_from", src, "--output_dir", recut, "--distance_threshold", eps, workers=2)
        assert read_rows(direct) == read_rows(recut), eps
        assert md["num_clusters"] == mr["num_clusters"] and 1 < md["num_clusters"] < len(x)
        # A re-cut of a re-cut.
        again = tmp_path / f"again-{eps:.4f}"
        run("--recut_from", recut, "--output_dir", again, "--distance_threshold", eps)
        assert read_rows(again) == read_rows(direct)
    assert read_labels(str(src), ids)[0].tolist() != read_labels(str(tmp_path / f"recut-{mid:.4f}"), ids)[0].tolist()


def nearest_achievable(heights, n, rule, value):
    """Brute force over every threshold in {0} | heights: the cut nearest the target."""
    best = None
    for t in sorted({0.0, *map(float, heights)}):
        clusters = n - int((heights <= t).sum())
        got = n / clusters if rule == "target" else clusters
        if best is None or abs(got - value) < best[0] - 1e-12:
            best = (abs(got - value), clusters)
    return best[1]


@pytest.mark.slow
def test_target_and_num_clusters_cuts_land_on_the_nearest_achievable(tmp_path):
    x = blobs(900, d=12, k=30, spread=0.35, seed=13)
    n = len(x)
    ids = ids_for(n)
    pattern = write_pool(str(tmp_path / "in"), x, ids)
    top = 0.5
    src = tmp_path / "top"
    run("--embeddings", pattern, "--output_dir", src, "--distance_threshold", top)
    merges = read_merges(src)
    md = hik.monotone_heights(merges)
    for flag, rule, value in (("--num_clusters", "num_clusters", 45), ("--num_clusters", "num_clusters", 200),
                              ("--target_mean_cluster_size", "target", 10.0),
                              ("--target_mean_cluster_size", "target", 3.3)):
        want = nearest_achievable(md, n, rule, value)
        direct = tmp_path / f"direct-{rule}-{value}"
        m = run("--embeddings", pattern, "--output_dir", direct, flag, value, "--max_distance", top)
        labels, sizes = read_labels(str(direct), ids)
        assert len(np.unique(labels)) == m["num_clusters"] == m["clusters"] == want, (rule, value)
        assert m["cut"]["rule"] == rule and m["cut"]["requested"] == value
        assert m["mean_cluster_size"] == pytest.approx(n / want)
        assert m["max_distance"] == top and m["distance_threshold"] <= top
        assert np.array_equal(sizes, np.unique(labels, return_inverse=True, return_counts=True)[2][
            np.unique(labels, return_inverse=True)[1]])
        # The chosen eps reproduces the cut, and a re-cut with the same target agrees.
        assert n - want == int((md <= m["distance_threshold"]).sum())
        recut = tmp_path / f"recut-{rule}-{value}"
        r = run("--recut_from", src, "--output_dir", recut, flag, value)
        assert read_rows(recut) == read_rows(direct)
        assert r["cut"]["distance_threshold"] == m["distance_threshold"]
        # The same cut by distance: every rule is one cut of one hierarchy.
        by_eps = tmp_path / f"eps-{rule}-{value}"
        run("--recut_from", src, "--output_dir", by_eps, "--distance_threshold", m["distance_threshold"])
        assert read_rows(by_eps) == read_rows(direct)
        assert artifacts.read_manifest(str(direct))["cut"]["num_clusters"] == want
    # Unreachable below --max_distance: fails naming the flag, no manifest.
    coarsest = n - len(merges)
    with pytest.raises(InputError, match="--num_clusters .*max_distance"):
        run("--embeddings", pattern, "--output_dir", tmp_path / "bad", "--num_clusters", coarsest - 1,
            "--max_distance", top, workers=2)
    assert artifacts.read_manifest(str(tmp_path / "bad")) is None
    with pytest.raises(InputError, match="--target_mean_cluster_size .*max_distance of --recut_from"):
        run("--recut_from", src, "--output_dir", tmp_path / "bad2", "--target_mean_cluster_size", n / coarsest + 1)
    assert artifacts.read_manifest(str(tmp_path / "bad2")) is None


def test_bad_cut_flags_fail_before_any_work_naming_the_flag(tmp_path, capsys):
    x = blobs(60, seed=14)
    ids = ids_for(len(x))
    pattern = write_pool(str(tmp_path / "in"), x, ids, files=1)
    src = tmp_path / "src"
    run("--embeddings", pattern, "--output_dir", src, "--distance_threshold", 0.3)
    out = str(tmp_path / "out")
    cases = [
        (["--embeddings", pattern], "exactly one of --distance_threshold"),
        (["--embeddings", pattern, "--distance_threshold", 0.2, "--num_clusters", 5], "got --distance_threshold, --num_clusters"),
        (["--embeddings", pattern, "--num_clusters", 5], "--max_distance is required with --num_clusters"),
        (["--embeddings", pattern, "--target_mean_cluster_size", 5], "--max_distance is required with --target_mean"),
        (["--embeddings", pattern, "--target_mean_cluster_size", 0.5, "--max_distance", 0.3],
         "--target_mean_cluster_size must be a finite number >= 1"),
        (["--embeddings", pattern, "--distance_threshold", 0.3, "--max_distance", 0.2], "--max_distance"),
        (["--embeddings", pattern, "--num_clusters", 5, "--max_distance", 2.5], "--max_distance: cosine"),
        (["--distance_threshold", 0.2], "--embeddings is required"),
        (["--recut_from", src, "--embeddings", pattern, "--distance_threshold", 0.2], "--embeddings: not used"),
        (["--recut_from", src, "--distance_threshold", 0.2, "--max_distance", 0.3], "--max_distance: not used"),
        (["--recut_from", src, "--distance_threshold", 0.4], "--distance_threshold 0.4 is above the max_distance 0.3"),
        (["--recut_from", src, "--num_clusters", 3, "--target_mean_cluster_size", 3], "exactly one of"),
        (["--recut_from", src], "exactly one of"),
        (["--recut_from", tmp_path / "in", "--distance_threshold", 0.2], "--recut_from: .* no manifest.json"),
    ]
    for flags, message in cases:
        with pytest.raises(InputError, match=message):
            run(*flags, "--output_dir", out)
        assert not os.path.exists(out), flags  # nothing was written
    with pytest.raises(InputError, match="--output_dir must differ"):
        run("--recut_from", src, "--output_dir", src, "--distance_threshold", 0.2, "--overwrite")
    assert artifacts.read_manifest(str(src)) is not None
    for flags in (["--num_clusters", "0"], ["--num_clusters", "2.5"], ["--max_distance", "-1"],
                  ["--target_mean_cluster_size", "nan"]):
        with pytest.raises(SystemExit):
            run("--embeddings", pattern, "--output_dir", out, *flags)
        assert flags[0] in capsys.readouterr().err
