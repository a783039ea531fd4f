"""cm_beam.clustering.hierarchy_kernels: cuts of a recorded merge hierarchy against scipy's fcluster,
cut selection against brute force over every achievable cut."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage, maxdists
from scipy.spatial.distance import cdist

from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.errors import InputError
from tests.test_hac_kernels import _blobs, _prepare, gap_thresholds, same_partition


def exact_hierarchy(x, metric, eps, ids):
    """hac_in_memory with every pair a candidate, run to eps: (Merges, final labels)."""
    n = len(x)
    u, v = np.triu_indices(n, 1)
    c = hk.Clusters(ids.copy(), np.ones(n, np.int64), x.copy(), np.einsum("ij,ij->i", x, x), ids.copy())
    final, (losers, winners), _, _, log = hk.hac_in_memory(c, ids[u], ids[v], eps, metric, return_merges=True)
    m = hik.Merges.from_pairs(log["label_w"], log["label_l"], log["height"], log["size"], log["round"])
    return m, final


def cut(m, leaves, eps):
    md = hik.monotone_heights(m)
    return hik.relabel(leaves, hik.cut_table(m, md, eps))


def to_scipy(m, leaves):
    """The merges as a scipy linkage matrix (leaf i = leaves[i]), in round order."""
    n = len(leaves)
    node = {int(l): i for i, l in enumerate(leaves)}  # public id -> current scipy node
    size = {int(l): 1 for l in leaves}
    z = []
    for k in np.argsort(m.round, kind="stable"):
        a, b = int(m.a[k]), int(m.b[k])
        assert size[a] + size[b] == m.size[k], "sizes must add up"
        z.append([node[a], node[b], m.height[k], m.size[k]])
        node[a] = n + len(z) - 1
        size[a] = int(m.size[k])
        del node[b]
    return np.array(z, np.float64)


@pytest.mark.parametrize("metric,targets", [("cosine", (0.05, 0.15, 0.4)), ("sqeuclidean", (0.5, 2.0, 6.0))])
def test_cuts_of_one_exact_hierarchy_equal_fcluster(metric, targets):
    x = _prepare(_blobs(), metric)
    n = len(x)
    z = linkage(x, "average", metric=metric)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    eps_list = gap_thresholds(z[:, 2], targets)
    m, _ = exact_hierarchy(x, metric, max(eps_list) * 1.5, ids)
    md = hik.monotone_heights(m)
    for eps in eps_list:
        ref = fcluster(z, eps, "distance")
        labels, sizes = cut(m, ids, eps)
        assert same_partition(labels, ref), (metric, eps)
        assert np.array_equal(sizes, np.bincount(ref)[ref])
        # A flat cluster's id is its smallest leaf id.
        for lab in np.unique(labels)[:50]:
            assert lab == ids[labels == lab].min()
        assert n - len(np.unique(labels)) == int((md <= eps).sum()) == int((m.height <= eps).sum())


def test_merge_table_is_consistent_with_numpy_average_linkage():
    x = _prepare(_blobs(80, d=6, k=5, seed=5), "sqeuclidean")
    n = len(x)
    ids = np.random.default_rng(0).choice(10**12, n, replace=False).astype(np.int64)
    m, final = exact_hierarchy(x, "sqeuclidean", 1e9, ids)  # to the root
    assert len(m) == n - 1 and len(final) == 1
    assert (m.a < m.b).all()
    # Members of every node, replayed in round order; the height is the mean pairwise
    # squared distance between the two children's members.
    members = {int(l): [i] for i, l in enumerate(ids)}
    for k in np.argsort(m.round, kind="stable"):
        a, b = members[int(m.a[k])], members.pop(int(m.b[k]))
        assert len(a) + len(b) == m.size[k]
        want = cdist(x[a], x[b], "sqeuclidean").mean()
        assert abs(m.height[k] - want) <= 1e-9 * max(1.0, want)
        assert min(ids[a].min(), ids[b].min()) == m.a[k]
        members[int(m.a[k])] = a + b
    # Exact average linkage is reducible: no merge below a child.
    assert np.array_equal(hik.monotone_heights(m), m.height)
    # The same dendrogram as scipy's (heights sorted).
    z = linkage(x, "average", metric="sqeuclidean")
    np.testing.assert_allclose(np.sort(m.height), np.sort(z[:, 2]), rtol=1e-9, atol=1e-9)


def random_hierarchy(n, rng, monotone=False, max_rounds=40):
    """Random rounds of disjoint pair merges with random (often non-monotone) heights."""
    leaves = rng.choice(1 << 40, n, replace=False).astype(np.int64)
    alive = {int(l): (1, 0.0) for l in leaves}
    rows = []
    r = 0
    while len(alive) > 1 and r < max_rounds:
        keys = rng.permutation(np.array(sorted(alive)))
        pairs = keys[: 2 * (len(keys) // 2)].reshape(-1, 2)[: max(1, len(keys) // 3)]
        for a, b in pairs:
            (sa, ha), (sb, hb) = alive.pop(int(a)), alive.pop(int(b))
            h = float(rng.integers(0, 12)) / 4  # coarse values: many ties
            if monotone:
                h = max(h, ha, hb)
            rows.append((a, b, h, sa + sb, r))
            alive[int(min(a, b))] = (sa + sb, h)
        r += 1
    a, b, h, s, rr = map(np.array, zip(*rows))
    return hik.Merges.from_pairs(a, b, h, s, rr), leaves


@pytest.mark.parametrize("seed", range(4))
def test_non_monotone_hierarchy_cuts_like_fcluster(seed):
    """Inversions: a cut keeps a node whole only if its whole subtree is <= eps (fcluster)."""
    rng = np.random.default_rng(seed)
    m, leaves = random_hierarchy(300, rng)
    z = to_scipy(m, leaves)
    md = hik.monotone_heights(m)
    order = np.argsort(m.round, kind="stable")
    np.testing.assert_array_equal(md[order], maxdists(z))
    assert (md > m.height).any(), "the random tree should have inversions"
    for eps in (0.0, 0.25, 0.6, 1.0, 1.75, 2.5, 3.0):
        labels, sizes = cut(m, leaves, eps)
        ref = fcluster(z, eps, "distance")
        assert same_partition(labels, ref), eps
        assert np.array_equal(sizes, np.bincount(ref)[ref])
        table = hik.cut_table(m, md, eps)
        applied = int((md <= eps).sum())
        summary = hik.cut_summary(len(leaves), table, "distance", eps, eps, applied)
        assert summary["num_clusters"] == len(np.unique(ref))
        assert sum(summary["size_histogram"].values()) == summary["num_clusters"]


def brute_force(md, n, rule, value):
    """Every achievable cut from scratch: (eps, clusters) at each threshold in {0} | heights."""
    best = None
    for t in sorted(set([0.0] + [float(h) for h in md if h > 0])):
        clusters = n - int(sum(1 for h in md if h <= t))
        got = n / clusters if rule == "target" else clusters
        if best is None or abs(got - value) < best[0]:
            best = (abs(got - value), t, clusters)
    return best[1], best[2]


@pytest.mark.parametrize("seed", range(3))
def test_choose_cut_is_the_nearest_achievable_cut(seed):
    rng = np.random.default_rng(seed)
    m, leaves = random_hierarchy(200, rng, monotone=True, max_rounds=6)
    n = len(leaves)
    md = np.sort(hik.monotone_heights(m))
    coarsest = n - len(md)
    for c in [coarsest, coarsest + 1, 17, 33, 50, 99, 150, n - 1, n, n + 5]:
        if c < coarsest:
            continue
        eps, applied = hik.choose_cut(md, n, "num_clusters", c, 10.0)
        want_eps, want_clusters = brute_force(md, n, "num_clusters", c)
        assert (eps, n - applied) == (want_eps, want_clusters), c
    for s in [1.0, 1.05, 1.3, 2.0, 3.7, n / coarsest]:
        eps, applied = hik.choose_cut(md, n, "target", s, 10.0)
        want_eps, want_clusters = brute_force(md, n, "target", s)
        assert (eps, n - applied) == (want_eps, want_clusters), s
    # Ties in heights make counts unachievable: a requested count between two achievable
    # ones lands on the nearer.
    eps_all, applied_all = hik.achievable_cuts(md)
    gaps = np.flatnonzero(np.diff(applied_all) > 2)
    assert len(gaps), "coarse heights should leave gaps"
    i = gaps[0]
    hi_clusters, lo_clusters = n - applied_all[i], n - applied_all[i + 1]
    eps, applied = hik.choose_cut(md, n, "num_clusters", lo_clusters + 1, 10.0)
    assert n - applied == lo_clusters and eps == eps_all[i + 1]
    eps, applied = hik.choose_cut(md, n, "num_clusters", hi_clusters - 1, 10.0)
    assert n - applied == hi_clusters and eps == eps_all[i]
    # Unreachable below the hierarchy's top: named errors.
    with pytest.raises(InputError, match="--num_clusters .*--max_distance"):
        hik.choose_cut(md, n, "num_clusters", coarsest - 1, 10.0)
    with pytest.raises(InputError, match="--target_mean_cluster_size .*--max_distance"):
        hik.choose_cut(md, n, "target", n / coarsest + 0.5, 10.0)
    with pytest.raises(InputError, match="--distance_threshold"):
        hik.choose_cut(md, n, "distance", 11.0, 10.0)
    assert hik.choose_cut(md, n, "distance", 1.0, 10.0) == (1.0, int((md <= 1.0).sum()))


def test_relabel_without_merges_and_unknown_leaves():
    table = hik.cut_table(hik.Merges.empty(), np.zeros(0), 1.0)
    labels, sizes = hik.relabel(np.array([5, 9]), table)
    assert labels.tolist() == [5, 9] and sizes.tolist() == [1, 1]
    m = hik.Merges.from_pairs([9, 3], [5, 5], [0.1, 0.2], [2, 3], [0, 1])
    labels, sizes = hik.relabel(np.array([5, 9, 3, 11]), hik.cut_table(m, hik.monotone_heights(m), 0.2))
    assert labels.tolist() == [3, 3, 3, 11] and sizes.tolist() == [3, 3, 3, 1]
    labels, sizes = hik.relabel(np.array([5, 9, 3, 11]), hik.cut_table(m, hik.monotone_heights(m), 0.15))
    assert labels.tolist() == [5, 5, 3, 11] and sizes.tolist() == [2, 2, 1, 1]
