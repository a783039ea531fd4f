"""The ivf candidate search (knn_kernels.euclidean_radius / boundary_distances /
probe_cells, and KnnGraph's ivf mode) against brute force."""

import pickle

import apache_beam as beam
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.clustering.knn_graph import KnnGraph
from cm_beam.testing import reference_kernels
from tests.conftest import beam_args


def _clustered(n=1200, d=16, clusters=12, spread=0.35, seed=0, metric="cosine"):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    if metric == "cosine":
        return kk.normalise_rows(x)[0].astype(np.float32)
    return (3.0 * x).astype(np.float32)  # norms well above 1: the sqeuclidean slack matters


def _metric_dist(x, metric):
    x = x.astype(np.float64)
    return cdist(x, x, "cosine" if metric == "cosine" else "sqeuclidean")


def _ivf_topk(x, ids, centroids, k, metric, max_dist, num_probes):
    """The ivf search composed from the kernels as KnnGraph arranges it: own-cell top-k,
    probes from its k-th distance, each probe's top-k, merged."""
    own = kk.nearest_centroids(x, centroids, 1)[:, 0]
    parts, probed = [], 0
    bounds, probes = np.empty(len(x)), np.full((len(x), max(0, min(num_probes, len(centroids)) - 1)), -1)
    for cell in np.unique(own):
        m = np.flatnonzero(own == cell)
        nb, nd = kk.block_topk(x[m], ids[m], x[m], ids[m], k, metric, max_dist)
        parts.append(kk.dense_to_edges(ids[m], nb, nd))
        bounds[m] = np.minimum(kk.kth_distance(nd), kk._distance_cut(metric, max_dist))
        radius = kk.euclidean_radius(bounds[m], metric, kk.sq_norms(x[m]).astype(np.float64))
        probes[m] = kk.probe_cells(x[m], centroids, own[m], radius, num_probes)
    for cell in np.unique(own):
        data = np.flatnonzero(own == cell)
        q = np.flatnonzero((probes == cell).any(axis=1))
        if not len(q):
            continue
        probed += len(q)
        nb, nd = kk.block_topk(x[q], ids[q], x[data], ids[data], k, metric, max_dist)
        parts.append(kk.dense_to_edges(ids[q], nb, nd))
    edges = kk.topk_edges(*(np.concatenate([p[i] for p in parts]) for i in range(3)), k, distinct=True)
    return edges, probed / len(x)


def _sorted(src, dst, dist):
    order = np.lexsort((dst, src))
    return src[order], dst[order], dist[order]


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_boundary_distance_never_exceeds_the_distance_to_a_point_of_that_cell(metric):
    """For every pair (x, y): |x - y| >= the distance from x to the boundary of y's cell
    (Euclidean on the prepared vectors), and euclidean_radius of the metric distance is
    at least |x - y|: the two together make the probe rule safe for both metrics."""
    x = _clustered(600, metric=metric, seed=1)
    cents = kk.kmeans(x, 9, 5, seed=3)
    own = kk.nearest_centroids(x, cents, 1)[:, 0]
    h = kk.boundary_distances(x, cents, own)
    eu = cdist(x.astype(np.float64), x.astype(np.float64))
    lower = h[:, own]  # [x, y]: boundary of y's cell as seen from x
    assert np.all(eu >= lower - 1e-9)
    assert np.isinf(h[np.arange(len(x)), own]).all()
    # Tight somewhere: the bound is not trivially small.
    other = own[None, :] != own[:, None]
    assert np.median((lower / np.maximum(eu, 1e-12))[other]) > 0.3
    d32 = kk.pair_distances(x, x, metric)
    sq = kk.sq_norms(x).astype(np.float64)
    radius = kk.euclidean_radius(d32, metric, sq[:, None])
    assert np.all(radius >= eu)
    # ... by a float32 slack only (relative to the squared norms).
    assert np.all(radius ** 2 - eu ** 2 <= 1e-4 * (1.0 + 2.0 * (sq[:, None] + sq[None, :])))


def test_probe_cells_are_the_nearest_boundaries_within_the_radius():
    x = _clustered(400, seed=2)
    cents = kk.kmeans(x, 10, 5, seed=1)
    own = kk.nearest_centroids(x, cents, 1)[:, 0]
    rng = np.random.default_rng(0)
    radius = rng.uniform(0.0, 1.0, len(x))
    radius[:20] = np.inf
    h = kk.boundary_distances(x, cents, own)
    for num_probes in (1, 3, 10, 50):
        got = kk.probe_cells(x, cents, own, radius, num_probes, chunk=64)
        assert got.shape == (len(x), min(num_probes, 10) - 1)
        for i in range(len(x)):
            # Reference: other cells by boundary distance; those within the radius, capped.
            # (probe_cells lowers each boundary by a float slack of < 1e-3 here.)
            order = [c for c in np.argsort(h[i], kind="stable") if c != own[i]]
            sure = [c for c in order if h[i, c] <= radius[i] - 1e-3][: num_probes - 1]
            maybe = [c for c in order if h[i, c] <= radius[i] + 1e-3][: num_probes - 1]
            row = [c for c in got[i] if c >= 0]
            assert own[i] not in row
            assert set(sure) <= set(row) <= set(maybe)
            assert row == sorted(row, key=lambda c: h[i, c])
        if num_probes > 1:
            assert (got[:20] >= 0).all()  # unbounded rows take the cap


def _uniform3(metric, n=900, seed=4):
    """Uniform points in 3 dims: neighbour balls cross cell boundaries near the bound."""
    x = np.random.default_rng(seed).uniform(-1, 1, size=(n, 3))
    return (kk.normalise_rows(x)[0] if metric == "cosine" else x).astype(np.float32)


@pytest.mark.parametrize("data,metric,max_dist", [
    ("clustered", "cosine", np.inf), ("clustered", "cosine", 0.3), ("clustered", "sqeuclidean", np.inf),
    ("clustered", "sqeuclidean", 20.0), ("uniform3", "cosine", np.inf), ("uniform3", "cosine", 0.02),
    ("uniform3", "sqeuclidean", np.inf), ("uniform3", "sqeuclidean", 0.05)])
def test_ivf_with_every_cell_allowed_equals_exact_knn(data, metric, max_dist, monkeypatch):
    """num_probes = the number of cells: the boundary bound alone decides which cells a
    point searches; it never excludes a true neighbour, so the lists equal brute force."""
    x = _clustered(900, metric=metric, seed=4) if data == "clustered" else _uniform3(metric)
    ids = np.random.default_rng(5).permutation(50_000)[: len(x)].astype(np.int64)
    cents = kk.kmeans(x, 15, 5, seed=2)
    k = 15
    (src, dst, dist), probed = _ivf_topk(x, ids, cents, k, metric, max_dist, num_probes=len(cents))
    want = kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, metric, max_dist))
    got, want = _sorted(src, dst, dist), _sorted(*want)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    # The bound prunes: far fewer cells searched than all 14 others.
    assert probed < 0.5 * (len(cents) - 1)
    # The other cells matter: the own cell alone misses neighbours.
    (own_src, own_dst, _), _ = _ivf_topk(x, ids, cents, k, metric, max_dist, num_probes=1)
    assert set(zip(want[0].tolist(), want[1].tolist())) - set(zip(own_src.tolist(), own_dst.tolist()))
    if data == "uniform3":
        # The bound is near tight here: a radius 20% short loses neighbours, so the
        # equality above checks the bound itself, not only a wide margin around it.
        radius = kk.euclidean_radius
        monkeypatch.setattr(kk, "euclidean_radius", lambda *a: 0.8 * radius(*a))
        (short_src, short_dst, _), _ = _ivf_topk(x, ids, cents, k, metric, max_dist, num_probes=len(cents))
        missed = set(zip(want[0].tolist(), want[1].tolist())) - set(zip(short_src.tolist(), short_dst.tolist()))
        assert missed


def test_ivf_recall_on_clustered_data_against_brute_force():
    """Clustered data, 40 cells, the default 6 probes: recall@k >= 0.99 against brute force
    (the old rule, each point in its 2 nearest cells and candidates sharing a cell, is
    measured beside it), and >= 99.5% of the within-eps lists' edges at 6 probes."""
    x = _clustered(4000, d=24, clusters=30, spread=0.5, seed=6)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    cents = kk.kmeans(x, 40, 8, seed=1)
    k = 20
    exact_ids, exact_d = reference_kernels.brute_force_topk(x, ids, k, "cosine")
    (src, dst, _), _ = _ivf_topk(x, ids, cents, k, "cosine", np.inf, num_probes=6)
    approx = np.full((len(x), k), -1, np.int64)
    row = np.searchsorted(ids, src)
    col = np.arange(len(src)) - np.searchsorted(src, src)
    approx[row, col] = dst
    recall = kk.recall_at_k(approx, exact_ids)
    # Old rule: two nearest cells each, all pairs inside a cell.
    near = kk.nearest_centroids(x, cents, 2)
    old = []
    for i in range(len(x)):
        cand = np.flatnonzero((near == near[i, 0]).any(axis=1) | (near == near[i, 1]).any(axis=1))
        cand = cand[cand != i]
        d = 1.0 - x[cand] @ x[i]
        old.append(ids[cand[np.lexsort((ids[cand], d))[:k]]])
    old_recall = kk.recall_at_k(np.array([np.pad(o, (0, k - len(o)), constant_values=-1) for o in old]), exact_ids)
    assert recall >= 0.99
    assert recall > old_recall
    eps = float(np.quantile(exact_d[:, 5], 0.5))  # half the points have >= 6 neighbours within eps
    (src_e, dst_e, _), _ = _ivf_topk(x, ids, cents, k, "cosine", eps, num_probes=6)
    want = kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, "cosine", eps))
    got_pairs = set(zip(src_e.tolist(), dst_e.tolist()))
    want_pairs = set(zip(want[0].tolist(), want[1].tolist()))
    assert len(got_pairs & want_pairs) >= 0.995 * len(want_pairs)


def _ivf_graph(tmp_path, x, ids, shards, cents, k, metric, max_dist, sample):
    """KnnGraph's ivf mode with num_probes = the number of cells: (sorted edges, recall)."""
    blocks = [(int(s), {"ids": ids[shards == s], "vecs": x[shards == s], "normalise": False})
              for s in np.unique(shards)]

    def save(value, name):
        with open(str(tmp_path / name), "wb") as f:
            pickle.dump(value, f)

    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(beam_args(1))) as p:
        graph = p | beam.Create(blocks) | KnnGraph(
            k, metric, "ivf", num_shards=int(shards.max()) + 1, num_probes=len(cents), max_dist=max_dist,
            centroids=beam.pvalue.AsSingleton(p | "C" >> beam.Create([cents])),
            sample=beam.pvalue.AsSingleton(p | "S" >> beam.Create([sample])))
        graph["edges"] | beam.combiners.ToList() | beam.Map(save, "edges.pkl")
        graph["recall"] | "R" >> beam.Map(save, "recall.pkl")
    edges = pickle.load(open(str(tmp_path / "edges.pkl"), "rb"))
    recall = pickle.load(open(str(tmp_path / "recall.pkl"), "rb"))
    assert all((hk.shard_of(e["src"]) == s).all() for s, e in edges)
    return _sorted(*[np.concatenate([e[name] for _, e in edges]) for name in ("src", "dst", "dist")]), recall


def test_knn_graph_ivf_searches_a_cell_none_of_whose_points_search_out(tmp_path):
    """A tight cell (every point's k-th distance tiny: it searches nowhere) and a sparse one
    of fewer than k points (unbounded: it searches everywhere): the sparse points' lists
    need the tight cell's points, which must reach that search anyway."""
    rng = np.random.default_rng(3)
    tight = np.array([1.0, 0, 0, 0]) + 0.01 * rng.normal(size=(200, 4))
    sparse = np.array([0, 1.0, 0, 0]) + 0.5 * rng.normal(size=(5, 4))
    x = kk.normalise_rows(np.concatenate([tight, sparse]))[0].astype(np.float32)
    cents = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], np.float32)
    own = kk.nearest_centroids(x, cents, 1)[:, 0]
    assert (own[:200] == 0).all() and (own[200:] == 1).sum() >= 3
    n, k = len(x), 10
    ids = hk.make_ids(np.zeros(n, np.int64), rng.choice(1 << 40, n, replace=False).astype(np.uint64) << np.uint64(24))
    sample = {"ids": np.zeros(0, np.int64), "vecs": np.zeros((0, 4), np.float32)}
    got, _ = _ivf_graph(tmp_path, x, ids, np.zeros(n, np.int64), cents, k, "cosine", np.inf, sample)
    want = _sorted(*kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, "cosine")))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("metric,max_dist", [("cosine", 0.35), ("sqeuclidean", np.inf)])
def test_knn_graph_ivf_with_every_cell_allowed_equals_brute_force(tmp_path, metric, max_dist):
    """The Beam ivf path (assign, own cell, probes, merge per shard) with num_probes =
    the number of cells: each point's brute-force top-k within max_dist, exactly; and the
    recall sample reports 1.0."""
    x = _clustered(1500, metric=metric, seed=8)
    n, k = len(x), 20
    rng = np.random.default_rng(2)
    shards = rng.integers(0, 3, n)
    ids = hk.make_ids(shards, rng.choice(1 << 40, n, replace=False).astype(np.uint64) << np.uint64(24))
    cents = kk.kmeans(x[::2], 12, 6, seed=1)
    sample_rows = np.sort(rng.choice(n, 40, replace=False))
    low = hk.hash_part(ids[sample_rows])
    order = np.argsort(low)
    sample = {"ids": low[order], "vecs": x[sample_rows][order]}
    got, recall = _ivf_graph(tmp_path, x, ids, shards, cents, k, metric, max_dist, sample)
    want = _sorted(*kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, metric, max_dist)))
    assert len(got[0]) == len(want[0]) > n
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    assert recall["recall_at_k"] == 1.0 and recall["recall_within_eps"] == 1.0
    assert recall["recall_queries"] == len(sample_rows)
