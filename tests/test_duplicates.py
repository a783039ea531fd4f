"""Exact duplicates and tied distances in cm-cluster (issue 14 item 3): folded into weighted
points before the kNN, recorded as height-0 merges, ties resolved in few rounds; partitions
against scipy's average linkage, at the clustering's eps and at cuts below it."""

import json
import os

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from cm_beam.clustering import duplicates_kernels as dk
from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.clustering import knn_kernels as kk
from cm_beam.io import table_io
from pipelines import build_clusters
from tests.conftest import beam_args, gaussian_blobs, write_embeddings
from tests.test_build_clusters import ids_for, read_labels
from tests.test_hac_kernels import gap_thresholds, same_partition


# --- kernels ------------------------------------------------------------------------

def _groups_by_dict(x, ids):
    """Reference: rows with equal bytes, each mapped to the position of its smallest id."""
    best = {}
    for i, row in enumerate(np.ascontiguousarray(x, np.float32)):
        key = row.tobytes()
        if key not in best or ids[i] < ids[best[key]]:
            best[key] = i
    return np.array([best[np.ascontiguousarray(row, np.float32).tobytes()] for row in x])


@pytest.mark.parametrize("hash_rows", [dk.row_hashes, lambda bits: (bits[:, 0] % 3).astype(np.uint64)],
                         ids=["row_hashes", "colliding"])
def test_duplicate_groups_are_the_sets_of_equal_rows(hash_rows):
    """Against a dict of row bytes; a hash with many collisions (3 values) must give the same
    groups: rows are compared, not only hashed. -0.0 and 0.0 differ in bits: not folded."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 5)).astype(np.float32)
    base[7] = 0.0
    base[8] = -0.0
    x = base[rng.integers(0, 40, 400)]
    ids = rng.choice(10**9, len(x), replace=False).astype(np.int64)
    rep = dk.duplicate_groups(dk.row_bits(x), ids, hash_rows=hash_rows)
    assert np.array_equal(rep, _groups_by_dict(x, ids))
    assert not np.array_equal(dk.row_bits(base[7:8]), dk.row_bits(base[8:9]))
    reps, counts = dk.fold_counts(rep)
    assert counts.sum() == len(x) and np.array_equal(reps, np.unique(rep))


def test_row_hashes_depend_on_every_word_and_its_position():
    rng = np.random.default_rng(1)
    bits = dk.row_bits(rng.normal(size=(200, 7)).astype(np.float32))
    h = dk.row_hashes(bits)
    assert len(np.unique(h)) == len(h)
    swapped = bits[:, [1, 0, 2, 3, 4, 5, 6]]
    assert (dk.row_hashes(swapped) != h).all()
    assert np.array_equal(dk.row_hashes(bits[50:]), h[50:])  # a row's hash is its own


@pytest.mark.parametrize("size", [2, 3, 5, 8, 50, 1000])
def test_fold_merges_build_each_group_as_a_balanced_tree_at_height_0(size):
    rng = np.random.default_rng(size)
    labels = rng.choice(1 << 40, size + 3, replace=False).astype(np.int64)
    rep = np.r_[np.zeros(size, np.int64), size, size + 1, size + 2]  # one group and 3 singletons
    m = dk.fold_merges(labels, rep)
    assert len(m) == size - 1 and (m.height == 0).all() and (m.a < m.b).all()
    # Every id loses at most once; the root is the group's smallest label; sizes add up.
    assert len(np.unique(m.b)) == len(m.b)
    assert set(m.a) - set(m.b) == {labels[:size].min()}
    assert m.size.max() == size
    # One merge per id and round (monotone_heights needs it), in ceil(log2 size) rounds, all
    # before the clustering's round 0; a cut above 0 joins the group, a cut at 0 too.
    for r in np.unique(m.round):
        ends = np.concatenate([m.a[m.round == r], m.b[m.round == r]])
        assert len(np.unique(ends)) == len(ends)
    assert len(np.unique(m.round)) == int(np.ceil(np.log2(size))) and m.round.max() == -1
    md = hik.monotone_heights(m)
    assert (md == 0).all()
    got, sizes = hik.relabel(labels, hik.cut_table(m, md, 1e-12))
    assert (got[:size] == labels[:size].min()).all() and (sizes[:size] == size).all()
    assert np.array_equal(got[size:], labels[size:]) and (sizes[size:] == 1).all()


def test_nearest_centroid_per_row_does_not_depend_on_the_block():
    """Rows near the boundary of two centroids, in blocks of several sizes: each row's
    centroid is the one it gets alone, and the exact (float64) nearest one."""
    rng = np.random.default_rng(7)
    c = rng.normal(size=(6, 48)).astype(np.float32)
    mid = (c[0] + c[1]) / 2
    x = (mid + 1e-6 * rng.normal(size=(600, 48))).astype(np.float32)  # near-ties everywhere
    x = np.concatenate([x, rng.normal(size=(200, 48)).astype(np.float32)])
    exact = np.argmin(((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1), axis=1)
    alone = np.array([dk.nearest_centroid_per_row(x[i:i + 1], c)[0] for i in range(len(x))])
    assert np.array_equal(alone, exact)
    for size in (1, 3, 64, 333, len(x)):
        got = np.concatenate([dk.nearest_centroid_per_row(x[s:s + size], c, chunk=97) for s in range(0, len(x), size)])
        assert np.array_equal(got, alone), size
    # The plain float32 product flips some of these rows between blocks (49 here).
    whole = kk.nearest_centroids(x, c, 1)[:, 0]
    assert sum(int((kk.nearest_centroids(x[s:s + 3], c, 1)[:, 0] != whole[s:s + 3]).sum()) for s in range(0, 600, 3))


# --- cm-cluster against scipy ---------------------------------------------------------

def run(pattern, out, eps, *flags, workers=1):
    return build_clusters.run(["--embeddings", pattern, "--output_dir", str(out), "--distance_threshold", str(eps),
                               *map(str, flags)] + beam_args(workers))


def read_merges(out):
    return hik.Merges.concat([build_clusters.hierarchy.batch_to_merges(b) for b in
                              table_io.read_table(os.path.join(str(out), "merges-*.parquet")).to_batches()])


def scipy_linkage(x, metric):
    """scipy's average linkage on the vectors cm-cluster clusters (prepared: normalised or
    centred, rounded to float32), so identical inputs are identical there too."""
    prep = kk.prepared_vectors({"vecs": x, "normalise": metric == "cosine",
                                "center": None if metric == "cosine" else x.astype(np.float64).mean(0)})
    return linkage(prep, "average", metric=metric)


def pool_with_duplicates(seed=0):
    """200 distinct blob points; 49 of them repeated to groups of 2..50 rows (1,425 rows in
    all), rows shuffled; under cosine a group also holds a scaled copy (same unit vector)."""
    rng = np.random.default_rng(seed)
    base = gaussian_blobs(200, 12, 8, 0.4, seed).astype(np.float32)
    rows = [np.arange(200)] + [np.full(g - 1, i) for i, g in zip(rng.choice(200, 49, replace=False), range(2, 51))]
    x = base[np.concatenate(rows)]
    return x[rng.permutation(len(x))]


def test_6000_identical_rows_take_no_rounds(tmp_path):
    """The issue's case: 5,999 rounds and a 568 KB manifest before the fold."""
    x = np.repeat(np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32), 6000, axis=0)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=2, row_group=1000)
    m = run(pattern, tmp_path / "out", 0.2, "--max_distance", 0.5)
    labels, sizes = read_labels(str(tmp_path / "out"), ids)
    assert len(np.unique(labels)) == 1 and (sizes == 6000).all()
    assert m["duplicates_folded"] == 5999 and m["hierarchy"]["merges"] == 5999
    assert m["rounds"] <= 5, m["rounds"]
    assert os.path.getsize(tmp_path / "out" / "manifest.json") < 20_000
    merges = read_merges(tmp_path / "out")
    assert len(merges) == 5999 and (merges.height == 0).all() and (merges.round < 0).all()
    assert merges.size.max() == 6000
    # scipy: identical rows are one cluster at any threshold.
    assert (fcluster(scipy_linkage(x[:300], "cosine"), 1e-9, "distance") == 1).all()


@pytest.mark.parametrize("metric,targets", [("cosine", (0.05, 0.2, 0.5)),
                                            pytest.param("sqeuclidean", (1.0, 4.0, 12.0), marks=pytest.mark.slow)])
def test_duplicates_mixed_with_distinct_points_equal_scipy(tmp_path, metric, targets):
    """Every pair a candidate (k >= distinct points, exact kNN): the partition is scipy's at
    the clustering's eps and at cuts below it, down to a cut where only duplicates join
    (the height-0 merges)."""
    x = pool_with_duplicates()
    if metric == "cosine":
        x[::97] *= 2.0  # the same unit vector as its unscaled copies (when it has some)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=3, row_group=200)
    z = scipy_linkage(x, metric)
    low, mid, top = gap_thresholds(z[:, 2], targets)
    distinct = len(np.unique(kk.prepared_vectors({"vecs": x, "normalise": metric == "cosine",
                                                  "center": x.astype(np.float64).mean(0) if metric != "cosine"
                                                  else None}, np.float32), axis=0))
    out = tmp_path / "out"
    m = run(pattern, out, top, "--metric", metric, "--knn_mode", "exact", "--num_neighbors", len(x),
            "--num_shards", 4)
    assert m["duplicates_folded"] == len(x) - distinct > 1000
    got, _ = read_labels(str(out), ids)
    assert same_partition(got, fcluster(z, top, "distance")), top
    for eps in (mid, low, 1e-9):  # 1e-9: only exact duplicates join
        ref = fcluster(z, eps, "distance")
        r = build_clusters.run(["--recut_from", str(out), "--output_dir", str(tmp_path / f"cut-{eps}"),
                                "--distance_threshold", str(eps)] + beam_args())
        got, _ = read_labels(str(tmp_path / f"cut-{eps}"), ids)
        assert same_partition(got, ref), eps
        assert r["num_clusters"] == len(np.unique(ref))
    assert len(np.unique(fcluster(z, 1e-9, "distance"))) == distinct


def grid_squares(squares=6, side=4, gap=100.0):
    """`squares` far-apart side x side grids of spacing 1: distances tie everywhere."""
    g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(np.float32)
    return np.concatenate([g + gap * np.array([s, s % 2], np.float32) for s in range(squares)])


def regular_simplices(groups=4, size=150):
    """`groups` regular simplices (every pair inside a group at one distance) along far-apart axes."""
    x = np.zeros((groups * size, size + groups), np.float32)
    for g in range(groups):
        x[g * size:(g + 1) * size, :size] = 0.3 * np.eye(size, dtype=np.float32)
        x[g * size:(g + 1) * size, size + g] = 1.0
    return x


@pytest.mark.parametrize("case", ["grid", "simplex"])
def test_tied_distances_equal_scipy_in_few_rounds(tmp_path, case):
    """Groups whose pairs are all within eps and far from other groups: the partition is the
    groups whatever order the ties merge in (scipy's too). Inside a group almost every
    candidate pair ties; ties went to the smaller id before, and a simplex of t points took
    t - 1 rounds (one merge per round)."""
    x, metric, eps = (grid_squares(), "sqeuclidean", 20.0) if case == "grid" else (regular_simplices(), "cosine", 0.3)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=2, row_group=200)
    m = run(pattern, tmp_path / "out", eps, "--metric", metric, "--num_neighbors", 200)
    got, _ = read_labels(str(tmp_path / "out"), ids)
    ref = fcluster(scipy_linkage(x, metric), eps, "distance")
    assert same_partition(got, ref) and len(np.unique(ref)) in (4, 6)
    assert m["duplicates_folded"] == 0
    assert m["rounds"] <= 25, m["rounds"]


@pytest.mark.slow
def test_one_or_two_workers_and_any_sharding_give_the_same_output(tmp_path):
    x = pool_with_duplicates(seed=3)
    ids = ids_for(len(x))
    a = write_embeddings(str(tmp_path / "a"), x, ids, files=1, row_group=2000)
    perm = np.random.default_rng(1).permutation(len(x))
    b = write_embeddings(str(tmp_path / "b"), x[perm], [ids[i] for i in perm], files=4, row_group=100)
    m1 = run(a, tmp_path / "o1", 4.0, "--metric", "sqeuclidean", "--num_shards", 4)
    m2 = run(b, tmp_path / "o2", 4.0, "--metric", "sqeuclidean", "--num_shards", 4, "--max_inmemory_edges", 300,
             "--max_rounds", 4, workers=2)
    assert m1["duplicates_folded"] == m2["duplicates_folded"] > 1000
    assert m2["beam_rounds"] and not m1["beam_rounds"]
    l1, s1 = read_labels(str(tmp_path / "o1"), ids)
    l2, s2 = read_labels(str(tmp_path / "o2"), ids)
    assert np.array_equal(l1, l2) and np.array_equal(s1, s2)
    m_1, m_2 = read_merges(tmp_path / "o1"), read_merges(tmp_path / "o2")
    key = lambda m: sorted(zip(m.a.tolist(), m.b.tolist(), m.size.tolist()))
    assert key(m_1) == key(m_2)
