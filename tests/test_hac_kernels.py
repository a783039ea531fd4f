"""cm_beam.clustering.hac_kernels against brute force and scipy's exact average-linkage HAC."""

import math

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist

from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.testing import reference_kernels
from tests.conftest import gaussian_blobs


def _blobs(n=240, d=10, k=12, spread=0.35, seed=0):
    return gaussian_blobs(n, d, k, spread, seed)


def _prepare(x, metric):
    return kk.normalise_rows(x)[0] if metric == "cosine" else x - x.mean(axis=0)


def same_partition(a, b) -> bool:
    """Equal up to relabelling: the label pairs form a bijection."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def gap_thresholds(merge_heights, targets):
    """Each target moved to the middle of the gap between the merge heights around it,
    so float rounding (ours vs scipy's) cannot put a merge on the other side."""
    h = np.sort(merge_heights)
    out = []
    for t in targets:
        i = np.searchsorted(h, t)
        lo, hi = h[max(i - 1, 0)], h[min(i, len(h) - 1)]
        out.append(float((lo + hi) / 2) if hi - lo > 1e-9 else float(t))
    return out


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_linkage_from_sums_is_mean_pairwise_distance(metric):
    x = _prepare(_blobs(60), metric)
    a, b = x[:13], x[13:40]
    got = hk.linkage_from_sums(metric, [len(a)], a.sum(0)[None], [(a * a).sum()],
                               [len(b)], b.sum(0)[None], [(b * b).sum()])[0]
    want = cdist(a, b, metric).mean()
    assert abs(got - want) < 1e-12


@pytest.mark.parametrize("metric,targets", [("cosine", (0.05, 0.15, 0.4)), ("sqeuclidean", (0.5, 2.0, 6.0))])
def test_in_memory_rounds_equal_scipy_with_all_pairs(metric, targets):
    x = _prepare(_blobs(), metric)
    n = len(x)
    z = linkage(x, "average", metric=metric)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    u, v = np.triu_indices(n, 1)
    for eps in gap_thresholds(z[:, 2], targets):
        ref = fcluster(z, eps, "distance")
        c = hk.Clusters(ids.copy(), np.ones(n, np.int64), x.copy(), np.einsum("ij,ij->i", x, x), ids.copy())
        final, (losers, winners), stats, _ = hk.hac_in_memory(c, ids[u], ids[v], eps, metric)
        got = hk.resolve_parents(ids, losers, winners)
        assert same_partition(got, ref), (metric, eps)
        assert len(final) == len(np.unique(ref))
        assert sorted(final.counts.tolist()) == sorted(np.bincount(ref)[1:].tolist())
        assert sum(s.merges for s in stats) == n - len(final)


def _nearest_by_loop(src, dst, link, round_index, tie_scale):
    """Reference: per src, the dst of its first edge under (linkage in units of
    tie_scale * 2^-36, rounded down; pair priority of the round; dst id)."""
    best = {}
    for s_, d_, l_ in zip(src.tolist(), dst.tolist(), link.tolist()):
        prio = int(hk.pair_priority(np.array([s_]), np.array([d_]), round_index)[0])
        key = (math.floor(l_ / (tie_scale * 2.0 ** -36)), prio, d_)
        if s_ not in best or key < best[s_]:
            best[s_] = key
    return sorted(best), [best[s_][2] for s_ in sorted(best)]


def test_tie_keys_join_only_rounding_differences():
    link = np.array([-1e-3, 0.0, -0.0, 0.25, 0.25 + 1e-15, 0.25 + 1e-9, 2.0])
    keys = hk.tie_keys(link)
    assert (np.diff(keys[[0, 1, 3, 5, 6]]) > 0).all() and keys[1] == keys[2] and keys[3] == keys[4]
    # The resolution scales with tie_scale (sqeuclidean: the squared norms' size).
    assert hk.tie_keys(np.array([4e6]), 2.0 ** 22)[0] == hk.tie_keys(np.array([4e6 + 1e-8]), 2.0 ** 22)[0]
    assert hk.tie_keys(np.array([4e6]))[0] != hk.tie_keys(np.array([4e6 + 1e-8]))[0]


def test_nearest_candidates_break_ties_by_pair_priority():
    rng = np.random.default_rng(5)
    src = rng.integers(0, 40, 600)
    dst = rng.integers(0, 40, 600)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    # Many ties: exact, and within float rounding (1e-15 apart: ties too).
    link = rng.choice([0.1, 0.2, 0.3], len(src)) + rng.choice([0.0, 1e-15, 3e-3], len(src))
    s, nn, l = hk.nearest_candidates(src, dst, link, 3, tie_scale=0.5)
    want_s, want_nn = _nearest_by_loop(src, dst, link, 3, 0.5)
    assert not np.array_equal(nn, hk.nearest_candidates(src, dst, link, 4, tie_scale=0.5)[1])  # the round salts the order
    assert s.tolist() == want_s and nn.tolist() == want_nn
    # The priority is a function of the unordered pair: both ends see the same order.
    assert np.array_equal(hk.pair_priority(src, dst), hk.pair_priority(dst, src))
    # Reciprocal pairs: an edge first for both of its ends; the winner keeps the smaller id.
    w, lo = hk.reciprocal_pairs(s, nn)
    pos = {a: b for a, b in zip(s.tolist(), nn.tolist())}
    want = sorted((a, b) for a, b in pos.items() if a < b and pos.get(b) == a)
    assert sorted(zip(w.tolist(), lo.tolist())) == want


def _tied_cliques(groups, size, metric):
    """`groups` far-apart regular simplices of `size` points: every pair inside a group at
    the same distance, so every merge order inside a group is a tie."""
    x = np.zeros((groups * size, size + groups))
    for g in range(groups):
        x[g * size:(g + 1) * size, :size] = 0.3 * np.eye(size)
        x[g * size:(g + 1) * size, size + g] = 1.0
    return _prepare(x, metric)


@pytest.mark.parametrize("metric,eps", [("sqeuclidean", 0.5), ("cosine", 0.3)])
def test_tied_cliques_merge_in_few_rounds_and_equal_scipy(metric, eps):
    """A clique of t tied points took t - 1 rounds when ties went to the smaller id (every
    point chose the same one); with the pair priority about half of them merge per round."""
    x = _tied_cliques(3, 200, metric)
    n = len(x)
    ids = np.sort(np.random.default_rng(2).choice(2**40, n, replace=False)).astype(np.int64)
    u, v = np.triu_indices(n, 1)
    c = hk.Clusters(ids.copy(), np.ones(n, np.int64), x.copy(), np.einsum("ij,ij->i", x, x), ids.copy())
    final, (losers, winners), stats, _ = hk.hac_in_memory(c, ids[u], ids[v], eps, metric)
    ref = fcluster(linkage(x, "average", metric=metric), eps, "distance")
    assert same_partition(hk.resolve_parents(ids, losers, winners), ref)
    assert len(final) == 3
    assert len(stats) <= 25, [s.merges for s in stats]  # 17 here; 199 with ties to the smaller id


def test_relabel_canonical_and_resolve():
    u, v = hk.relabel_edges(np.array([5, 7, 9, 7]), np.array([7, 9, 5, 5]), np.array([7, 9]), np.array([5, 5]))
    assert u.tolist() == [] and v.tolist() == []  # all collapse to self-loops on 5
    u, v = hk.relabel_edges(np.array([5, 8, 3]), np.array([8, 9, 9]), np.array([9]), np.array([3]))
    assert list(zip(u.tolist(), v.tolist())) == [(3, 8), (5, 8)]
    # chains: 9 -> 7 -> 2, 4 -> 2
    got = hk.resolve_parents(np.array([9, 7, 4, 2, 11]), np.array([9, 7, 4]), np.array([7, 2, 2]))
    assert got.tolist() == [2, 2, 2, 2, 11]


def test_ids_and_histogram():
    h = np.array([2**64 - 1, 12345, 0], dtype=np.uint64)
    ids = hk.make_ids(np.array([5, 0, hk.MAX_SHARDS - 1]), h)
    assert (ids >= 0).all() and hk.shard_of(ids).tolist() == [5, 0, hk.MAX_SHARDS - 1]
    assert (hk.public_labels(h) >= 0).all()
    assert hk.size_histogram(np.array([1, 1, 2, 3, 4, 5, 9])) == {"1": 2, "2": 1, "3-4": 2, "5-8": 1, "9-16": 1}


def test_fast_in_memory_rounds_match_the_simple_round_on_a_sparse_graph():
    """hac_in_memory caches linkages of untouched edges; rnn_round recomputes all."""
    x = _prepare(_blobs(400, seed=3), "cosine")
    n = len(x)
    ids = np.sort(np.random.default_rng(1).choice(10**9, n, replace=False)).astype(np.int64)
    nb, _ = kk.block_topk(x.astype(np.float32), ids, x.astype(np.float32), ids, 8, "cosine")
    u, v = np.repeat(ids, 8), nb.ravel()
    make = lambda: hk.Clusters(ids.copy(), np.ones(n, np.int64), x.copy(), np.zeros(n), ids.copy())
    final, (losers, winners), stats, _ = hk.hac_in_memory(make(), u, v, 0.3, "cosine")
    c, uu, vv = make(), *hk.canonical_edges(u, v)
    simple_l, simple_w, merges = [], [], []
    while len(uu):
        c, uu, vv, w, l, st = reference_kernels.rnn_round(c, uu, vv, 0.3, "cosine", len(merges))
        simple_l.append(l); simple_w.append(w); merges.append(st.merges)
    assert np.array_equal(np.concatenate(simple_l), losers) and np.array_equal(np.concatenate(simple_w), winners)
    assert sum(s.merges for s in stats) == sum(merges) == n - len(final)
    assert np.array_equal(c.ids, final.ids) and np.allclose(c.sums, final.sums)


def test_dense_canonical_edges_and_the_edge_limit():
    rng = np.random.default_rng(4)
    ids = np.sort(rng.choice(1 << 62, 300, replace=False)).astype(np.int64)
    u, v = ids[rng.integers(0, 300, 5000)], ids[rng.integers(0, 300, 5000)]
    a, b = hk.canonical_edges(u, v)
    ia, ib = hk.dense_canonical_edges(ids, u, v)
    assert np.array_equal(ids[ia], a) and np.array_equal(ids[ib], b)  # same edges, same order
    with pytest.raises(ValueError, match="not in the state"):
        hk.dense_canonical_edges(ids[1:], u, v)
    c = hk.Clusters(ids, np.ones(300, np.int64), rng.normal(size=(300, 4)), np.zeros(300), ids.copy())
    with pytest.raises(hk.TooManyEdges) as e:
        hk.hac_in_memory(c, u, v, 0.5, "sqeuclidean", max_edges=len(a) - 1)
    assert e.value.edges == len(a)
    assert hk.hac_in_memory(c, u, v, 0.5, "sqeuclidean", max_edges=len(a))[2][0].edges == len(a)


def test_cluster_state_pickles_losslessly_with_float32_rows():
    import pickle

    rng = np.random.default_rng(0)
    n, d, singles = 5000, 64, 3000
    sums = rng.normal(size=(n, d))
    sums[:singles] = sums[:singles].astype(np.float32)  # singleton-like rows: float32 values
    counts = np.r_[np.ones(singles, np.int64), np.full(n - singles, 3)]
    c = hk.Clusters(np.arange(n), counts, sums, rng.random(n), np.arange(n))
    back = pickle.loads(pickle.dumps(c))
    for name in ("ids", "counts", "sums", "sq", "labels"):
        assert np.array_equal(getattr(back, name), getattr(c, name)), name
    assert back.sums.dtype == np.float64
    saved = len(pickle.dumps((c.ids, c.counts, c.sums, c.sq, c.labels))) - len(pickle.dumps(c))
    assert saved > 0.95 * singles * d * 4, "float32-exact rows should travel as float32"


def test_unique_sorted_is_np_unique():
    from cm_beam.array_ops import unique_sorted

    rng = np.random.default_rng(9)
    for a in (rng.integers(0, 50, 10_000), rng.integers(-(1 << 62), 1 << 62, 5000), np.zeros(0, np.int64),
              np.array([7]), rng.integers(0, 3, (40, 5))):
        got = unique_sorted(a)
        assert np.array_equal(got, np.unique(a)) and got.dtype == np.asarray(a).dtype
