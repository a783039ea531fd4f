"""cm_beam.clustering.knn_kernels against brute force (scipy cdist, full sorts)."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cm_beam.clustering import knn_kernels as kk


def _points(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, d))
    return (centers[rng.integers(0, 8, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)


def _naive_topk(x, ids, k, metric):
    """Per row: sort all other points by (distance, id) with float64 cdist."""
    xx = x.astype(np.float64)
    dist = cdist(xx, xx, "sqeuclidean" if metric == "sqeuclidean" else "cosine")
    out = []
    for i in range(len(x)):
        cand = [(dist[i, j], ids[j]) for j in range(len(x)) if j != i]
        cand.sort()
        out.append([c[1] for c in cand[:k]])
    return np.array(out), dist


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_pair_distances_match_cdist(metric):
    x = _points()
    if metric == "cosine":
        x = kk.normalise_rows(x)[0].astype(np.float32)
    got = kk.pair_distances(x[:50], x[50:120], metric)
    want = cdist(x[:50].astype(np.float64), x[50:120].astype(np.float64), metric)
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, want.max()))


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_block_topk_equals_brute_force(metric):
    x = _points()
    if metric == "cosine":
        x = kk.normalise_rows(x)[0].astype(np.float32)
    ids = np.arange(1000, 1000 + len(x), dtype=np.int64)
    want, dist = _naive_topk(x, ids, 10, metric)
    got_ids, got_d = kk.block_topk(x, ids, x, ids, 10, metric, chunk=64)
    # Same neighbour sets (float32 vs float64 can swap exact near-ties only).
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_ids, want)])
    assert agree > 0.995
    assert (got_ids != ids[:, None]).all()  # never itself
    assert np.all(np.diff(got_d, axis=1) >= 0)  # sorted


def test_block_topk_cut_pads_and_keeps_within():
    x = kk.normalise_rows(_points())[0].astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64)
    full_ids, full_d = kk.block_topk(x, ids, x, ids, 20, "cosine")
    cut_ids, cut_d = kk.block_topk(x, ids, x, ids, 20, "cosine", max_dist=0.05)
    within = full_d <= 0.05
    # Every neighbour truly within the cut survives; padding is (-1, inf).
    assert np.array_equal(np.where(within, full_ids, -1)[within], cut_ids[within])
    assert np.all((cut_ids == -1) == np.isinf(cut_d))
    assert np.all(cut_d[np.isfinite(cut_d)] <= 0.05 + kk.prune_tolerance("cosine", 0.05))


def test_topk_edges_of_column_split_lists_equals_whole():
    x = _points(seed=3)
    ids = np.arange(len(x), dtype=np.int64) * 7
    whole = kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, 15, "sqeuclidean"))
    parts = [kk.dense_to_edges(ids, *kk.block_topk(x, ids, x[s], ids[s], 15, "sqeuclidean"))
             for s in (slice(0, 100), slice(100, 220), slice(220, None))]
    # Overlapping parts (a neighbour seen twice) must count once.
    parts.append(kk.dense_to_edges(ids, *kk.block_topk(x, ids, x[50:150], ids[50:150], 15, "sqeuclidean")))
    got = kk.topk_edges(*(np.concatenate([p[i] for p in parts]) for i in range(3)), 15)
    assert np.array_equal(got[0], whole[0]) and np.array_equal(got[1], whole[1])
    np.testing.assert_allclose(got[2], whole[2], rtol=1e-5, atol=1e-5)


def test_topk_edges_dedupes_and_limits():
    src = np.array([1, 1, 1, 1, 2, 2, 1])
    dst = np.array([5, 6, 7, 5, 9, 8, 8])
    dist = np.array([0.3, 0.1, 0.2, 0.25, 0.5, 0.5, 0.4], np.float32)
    s, t, d = kk.topk_edges(src, dst, dist, 3)
    assert s.tolist() == [1, 1, 1, 2, 2]
    assert t.tolist() == [6, 7, 5, 8, 9]  # 5 keeps its smaller distance; ties by id
    np.testing.assert_allclose(d, [0.1, 0.2, 0.25, 0.5, 0.5])


def test_nearest_centroids_and_kmeans_deterministic():
    x = _points(500, seed=5)
    c1 = kk.kmeans(x, 8, 5, seed=1)
    c2 = kk.kmeans(x.copy(), 8, 5, seed=1)
    assert np.array_equal(c1, c2)
    near = kk.nearest_centroids(x, c1, 3)
    brute = np.argsort(cdist(x, c1, "sqeuclidean"), axis=1, kind="stable")[:, :3]
    assert (near[:, 0] == brute[:, 0]).mean() > 0.99
    # k-means beats its own start: inertia lower than random centres from the data.
    inertia = cdist(x, c1, "sqeuclidean").min(axis=1).sum()
    rand = cdist(x, x[:8], "sqeuclidean").min(axis=1).sum()
    assert inertia < rand


def test_prepared_vectors_and_recall():
    x = _points(20)
    unit = kk.prepared_vectors({"vecs": x, "normalise": True})
    # Unit vectors rounded to float32: the kNN stage (float32) and the clustering
    # (float64) see bit-identical points, and singleton sums travel as float32.
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(unit.astype(np.float32).astype(np.float64), unit)
    assert np.array_equal(kk.prepared_vectors({"vecs": x, "normalise": True}, np.float32), unit.astype(np.float32))
    mean = x.astype(np.float64).mean(axis=0)
    centred = kk.prepared_vectors({"vecs": x, "normalise": False, "center": mean})
    np.testing.assert_allclose(centred.mean(axis=0), 0.0, atol=1e-6)
    assert kk.recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, -1]])) == 0.5


def _sorted_edges(src, dst, dist):
    order = np.lexsort((dst, src))
    return src[order], dst[order], dist[order]


@pytest.mark.parametrize("metric,max_dist", [("cosine", 0.25), ("cosine", np.inf), ("sqeuclidean", 5.0)])
def test_own_block_bounds_and_pair_candidates_give_the_whole_topk(metric, max_dist):
    """Own-block top-k, then pair candidates under its k-th distance, merged: the same
    edges (and distances) as the top-k over the whole pool. Blocks of 7 points (fewer
    than k: unbounded) and a small chunk size (several chunks per pair) included."""
    x = _points(400, seed=7)
    if metric == "cosine":
        x = kk.normalise_rows(x)[0].astype(np.float32)
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[: len(x)].astype(np.int64)
    k = 12
    # Spatial blocks, as the pipeline's shards (tight bounds), plus 7 points of anywhere.
    shard = kk.nearest_centroids(x, kk.kmeans(x, 3, 5, seed=2), 1)[:, 0]
    shard[rng.choice(len(x), 7, replace=False)] = 3
    order = np.argsort(shard, kind="stable")
    x, ids, shard = x[order], ids[order], shard[order]
    blocks, parts = [], []
    for s in (3, 0, 1, 2):
        m = shard == s
        nb, nd = kk.block_topk(x[m], ids[m], x[m], ids[m], k, metric, max_dist)
        parts.append(kk.dense_to_edges(ids[m], nb, nd))
        blocks.append((x[m], ids[m], kk.kth_distance(nd)))
    assert np.isinf(blocks[0][2]).all() and np.isfinite(blocks[2][2]).any()
    pruned = 0
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            fwd, back = kk.pair_candidates(*blocks[i], *blocks[j], k, metric, max_dist, max_entries=2000)
            parts += [fwd, back]
            pruned += len(blocks[i][1]) * len(blocks[j][1]) * 2 - len(fwd[0]) - len(back[0])
    got = kk.topk_edges(*(np.concatenate([p[n] for p in parts]) for n in range(3)), k)
    want = kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, metric, max_dist))
    got, want = _sorted_edges(*got), _sorted_edges(*want)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    assert pruned > 0  # the bounds cut candidates (the point of them)


def test_topk_edges_of_distinct_edges_equals_a_plain_sort():
    rng = np.random.default_rng(3)
    src = rng.integers(0, 40, 3000) * 1_000_003 - 7
    dst = rng.integers(0, 500, 3000)
    pairs = np.unique(np.stack([src, dst], 1), axis=0)
    src, dst = pairs[:, 0], pairs[:, 1]
    dist = rng.integers(0, 30, len(src)).astype(np.float32) / 7  # many ties: broken by dst
    dist[:5] = -0.0
    dist[5:9] = np.inf
    perm = rng.permutation(len(src))
    # Reference: a plain sort by (src, dist, dst), then each src's first 9.
    rows = sorted(zip(src.tolist(), dist.tolist(), dst.tolist()))
    want = [r for i, r in enumerate(rows) if sum(1 for q in rows[max(0, i - 9):i] if q[0] == r[0]) < 9]
    for distinct in (True, False):
        got = kk.topk_edges(src[perm], dst[perm], dist[perm], 9, distinct=distinct)
        assert list(zip(got[0].tolist(), got[2].tolist(), got[1].tolist())) == want
