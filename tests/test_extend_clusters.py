"""cm-cluster's cluster state and `cm-cluster --extend` (issue 15), against plain numpy.

* state-*.parquet holds each cluster's count, sum and sum of squared norms (numpy sums of
  the members' prepared vectors);
* an extension by points farther than eps from every cluster = the old clusters plus the
  new points' own cm-cluster run;
* with every pair a candidate, an extension whose points join existing clusters gives
  the exact average linkage of the grown clusters: every new merge height is the mean
  pairwise distance of its two sides' members, no pair of final clusters with a new
  member is within eps, the state is the members' sums, and the partition is the
  sequential reference's (extend_kernels.extend_in_memory);
* examples removed from the pool vanish (rows and sums); duplicate ids fail naming the id;
* 1 and 2 workers give the same files; flags fail before any work.
"""

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import beam_args, gaussian_blobs, write_embeddings
from cm_beam.clustering import extend_kernels as ek
from cm_beam.clustering import knn_kernels as kk
from cm_beam.clustering.hac_kernels import Clusters
from cm_beam.errors import InputError
from pipelines import build_clusters

EPS = 0.1


def _table(directory, kind):
    return pq.read_table(sorted(glob.glob(os.path.join(directory, f"{kind}-*.parquet"))))


def _clusters(directory):
    t = _table(directory, "clusters")
    return {e: (c, s, l) for e, c, s, l in zip(*(t.column(n).to_pylist() for n in
                                                 ("example_id", "cluster_id", "cluster_size", "leaf_id")))}


def _state(directory):
    t = _table(directory, "state")
    return {c: (n, np.asarray(s), q) for c, n, s, q in zip(*(t.column(k).to_pylist() for k in ("cluster_id", "count", "sum", "sq")))}


def _prepared(x, metric, center=None):
    return kk.prepared_vectors({"vecs": np.asarray(x, np.float32), "normalise": metric == "cosine",
                                "center": None if center is None else np.asarray(center)}, np.float64)


def _cluster(emb, out, metric="cosine", extra=()):
    return build_clusters.run(["--embeddings", emb, "--distance_threshold", str(EPS), "--metric", metric,
                               "--output_dir", str(out)] + list(extra) + beam_args())


def _extend(source, emb, out, extra=(), workers=1):
    return build_clusters.run(["--extend", str(source), "--embeddings", emb, "--output_dir", str(out)]
                              + list(extra) + beam_args(workers))


def _ids(prefix, n, start=0):
    return np.array([f"{prefix}-{i:05d}" for i in range(start, start + n)])


def _check_state(directory, vectors, metric, center=None):
    """Every state row = numpy (count, sum, sum of squared norms) of its cluster's members."""
    rows = _clusters(directory)
    state = _state(directory)
    members = {}
    for e, (c, _, _) in rows.items():
        members.setdefault(c, []).append(e)
    assert set(state) == set(members)
    for c, names in members.items():
        x = _prepared(np.stack([vectors[e] for e in names]), metric, center)
        n, s, q = state[c]
        assert n == len(names) == rows[names[0]][1]
        np.testing.assert_allclose(s, x.sum(axis=0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(q, (x * x).sum() if metric == "sqeuclidean" else 0.0, rtol=1e-10, atol=1e-10)


# --- kernels -------------------------------------------------------------------------

def test_cluster_candidates_are_the_nearest_clusters_by_exact_linkage():
    rng = np.random.default_rng(0)
    for metric in ("cosine", "sqeuclidean"):
        members = [rng.normal(size=(int(rng.integers(1, 6)), 5)) for _ in range(40)]
        if metric == "cosine":
            members = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in members]
        labels = rng.integers(1 << 40, 1 << 62, len(members))
        nodes = Clusters(ek.node_ids(labels, 4), np.array([len(m) for m in members]),
                         np.stack([m.sum(0) for m in members]), np.array([(m * m).sum() for m in members]), labels)
        x = rng.normal(size=(30, 5))
        if metric == "cosine":
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        x_ids = np.arange(30, dtype=np.int64) + 7
        eps = 1.0 if metric == "cosine" else 6.0
        src, dst = ek.cluster_candidates(x, x_ids, nodes, 3, metric, eps)
        for i in range(30):
            # Plain mean of pairwise distances of the point to each cluster's members.
            d = np.array([np.mean(1 - m @ x[i]) if metric == "cosine" else np.mean(((m - x[i]) ** 2).sum(1))
                          for m in members])
            order = sorted(range(len(members)), key=lambda j: (d[j], nodes.ids[j]))
            want = [nodes.ids[j] for j in order if d[j] <= eps][:3]
            assert list(dst[src == x_ids[i]]) == want


def test_group_state_is_the_members_sums_in_any_row_order():
    rng = np.random.default_rng(1)
    owner = rng.integers(0, 7, 200)
    keys = rng.permutation(200)
    x = rng.normal(size=(200, 4))
    ids, counts, sums, sq = ek.group_state(owner, keys, x, "sqeuclidean")
    perm = rng.permutation(200)
    again = ek.group_state(owner[perm], keys[perm], x[perm], "sqeuclidean")
    for a, b in zip((ids, counts, sums, sq), again):
        assert np.array_equal(a, b)  # bit-identical: summed in (owner, key) order
    for j, c in enumerate(ids):
        m = owner == c
        assert counts[j] == m.sum()
        np.testing.assert_allclose(sums[j], x[m].sum(0))
        np.testing.assert_allclose(sq[j], (x[m] ** 2).sum())


# --- state ---------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_cluster_state_is_the_members_sums(tmp_path, metric):
    x = gaussian_blobs(300, 6, 20, spread=0.15, seed=2).astype(np.float32)
    ids = _ids("ex", 300)
    emb = write_embeddings(str(tmp_path / "emb"), x, ids)
    eps = EPS if metric == "cosine" else 0.3
    m = build_clusters.run(["--embeddings", emb, "--distance_threshold", str(eps), "--metric", metric,
                            "--output_dir", str(tmp_path / "c")] + beam_args())
    assert m["outputs"]["state"] == "state-*.parquet"
    assert (m["state_center"] is None) == (metric == "cosine")
    if metric == "sqeuclidean":
        np.testing.assert_allclose(m["state_center"], x.astype(np.float64).mean(0), rtol=1e-9)
    _check_state(str(tmp_path / "c"), dict(zip(ids, x)), metric, m["state_center"])


# --- extension -----------------------------------------------------------------------

def _orthant_pool(n, d, k, first_half, seed):
    """Unit-ish blobs in the first or second half of the coordinates: cosine distance ~1
    between the halves (far beyond EPS), tight blobs inside each."""
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(size=(k, d // 2))) + 0.5
    x = centers[rng.integers(0, k, n)] + 0.04 * rng.normal(size=(n, d // 2))
    z = np.zeros((n, d // 2))
    return (np.hstack([x, z]) if first_half else np.hstack([z, x])).astype(np.float32)


def test_extension_by_far_points_is_old_clusters_plus_their_own_hac(tmp_path):
    old_x = _orthant_pool(300, 8, 25, True, 3)
    new_x = _orthant_pool(60, 8, 6, False, 4)
    old_ids, new_ids = _ids("old", 300), _ids("new", 60)
    _cluster(write_embeddings(str(tmp_path / "old"), old_x, old_ids), tmp_path / "c_old")
    pool = write_embeddings(str(tmp_path / "pool"), np.vstack([old_x, new_x]), np.r_[old_ids, new_ids])
    m = _extend(tmp_path / "c_old", pool, tmp_path / "c_ext")
    # The premise: every new point is farther than eps from every existing cluster.
    state = _state(str(tmp_path / "c_old"))
    p = _prepared(new_x, "cosine")
    for n, s, _ in state.values():
        assert (1 - p @ s / n > EPS).all()
    own = _cluster(write_embeddings(str(tmp_path / "new"), new_x, new_ids), tmp_path / "c_new")
    old, ext, new = _clusters(str(tmp_path / "c_old")), _clusters(str(tmp_path / "c_ext")), _clusters(str(tmp_path / "c_new"))
    assert set(ext) == set(old) | set(new)
    assert {e: ext[e] for e in old} == old  # untouched clusters keep ids, sizes, leaves
    assert {e: ext[e] for e in new} == new  # the new points' own HAC, ids included
    e = m["extension"]
    assert e["new_examples"] == 60 and e["joined_existing"] == 0 and e["existing_merged"] == 0
    assert e["new_clusters"] == own["clusters"] and e["removed"] == 0 and e["touched_clusters"] == 0
    assert m["clusters"] == len(state) + own["clusters"]


def _linkage(a, b, metric):
    """Plain numpy average linkage: the mean of all pairwise distances."""
    if metric == "cosine":
        return float(np.mean(1 - a @ b.T))
    return float(np.mean(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)))


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_extension_with_every_pair_a_candidate_is_the_exact_linkage_of_the_grown_clusters(tmp_path, metric):
    x = gaussian_blobs(260, 6, 18, spread=0.12, seed=5).astype(np.float32)
    eps = EPS if metric == "cosine" else 0.25
    old_x, new_x = x[:220], x[220:]
    old_ids, new_ids = _ids("old", 220), _ids("new", 40)
    old_m = build_clusters.run(["--embeddings", write_embeddings(str(tmp_path / "old"), old_x, old_ids),
                                "--distance_threshold", str(eps), "--metric", metric, "--num_neighbors", "219",
                                "--knn_mode", "exact", "--output_dir", str(tmp_path / "c_old")] + beam_args())
    pool = write_embeddings(str(tmp_path / "pool"), x, np.r_[old_ids, new_ids])
    m = _extend(tmp_path / "c_old", pool, tmp_path / "c_ext",
                ["--num_neighbors", "39", "--extend_cluster_neighbors", str(old_m["clusters"])])
    center = old_m["state_center"]
    vec = dict(zip(np.r_[old_ids, new_ids], _prepared(x, metric, center)))
    old, ext = _clusters(str(tmp_path / "c_old")), _clusters(str(tmp_path / "c_ext"))
    e = m["extension"]
    assert e["joined_existing"] > 20 and e["merges"] > 20  # the new points did join existing clusters

    # Every merge of this run: its height is the mean pairwise distance of the two sides.
    groups = {}
    for ex, (c, _, _) in old.items():
        groups.setdefault(c, []).append(ex)
    for ex in new_ids:
        groups[ext[ex][2]] = [ex]
    merges = _table(str(tmp_path / "c_ext"), "merges").to_pydict()
    new_merges = sorted((r, a, b, h) for a, b, h, r in zip(merges["cluster_a"], merges["cluster_b"],
                                                           merges["height"], merges["round"])
                        if r >= old_m["rounds"])
    assert len(new_merges) == e["merges"] and len(merges["round"]) == len(new_merges) + old_m["hierarchy"]["merges"]
    for _, a, b, h in new_merges:
        ga, gb = groups.pop(a), groups.pop(b)
        exact = _linkage(np.stack([vec[i] for i in ga]), np.stack([vec[i] for i in gb]), metric)
        assert h == pytest.approx(exact, rel=1e-9, abs=1e-12) and h <= eps
        groups[a] = ga + gb
    # The final clusters are those groups, and no pair with a new member is within eps.
    final = {}
    for ex, (c, s, _) in ext.items():
        final.setdefault(c, []).append(ex)
    assert sorted(map(sorted, final.values())) == sorted(map(sorted, groups.values()))
    has_new = {c for c, g in final.items() if any(i.startswith("new") for i in g)}
    mats = {c: np.stack([vec[i] for i in g]) for c, g in final.items()}
    for c in has_new:
        for c2 in final:
            if c2 != c:
                assert _linkage(mats[c], mats[c2], metric) > eps
    _check_state(str(tmp_path / "c_ext"), dict(zip(np.r_[old_ids, new_ids], x)), metric, center)

    # The sequential reference (extend_kernels on hac_kernels) gives the same partition and ids.
    st = _state(str(tmp_path / "c_old"))
    labels = np.array(sorted(st), np.int64)
    nodes = Clusters(ek.node_ids(labels, 16), np.array([st[c][0] for c in labels]),
                     np.stack([st[c][1] for c in labels]), np.array([st[c][2] for c in labels]), labels)
    new_labels = np.array([ext[i][2] for i in new_ids], np.int64)
    _, label_of, _ = ek.extend_in_memory(nodes, _prepared(new_x, metric, center), new_labels, eps, metric, 39,
                                         len(labels), 16)
    for ex, (c, _, leaf) in ext.items():
        key = leaf if ex.startswith("new") else old[ex][0]
        assert label_of[int(ek.node_ids(np.array([key]), 16)[0])] == c


def test_examples_removed_from_the_pool_vanish(tmp_path):
    x = gaussian_blobs(240, 6, 15, spread=0.12, seed=6).astype(np.float32)
    ids = _ids("ex", 240)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:200], ids[:200]), tmp_path / "c_old")
    old = _clusters(str(tmp_path / "c_old"))
    sizes = {}
    for ex, (c, s, _) in old.items():
        sizes[c] = s
    big = sorted(sizes, key=lambda c: -sizes[c])
    whole = big[0]  # every member leaves
    part = big[1]   # some members leave
    part_members = sorted(e for e, (c, _, _) in old.items() if c == part)
    gone = {e for e, (c, _, _) in old.items() if c == whole} | set(part_members[: len(part_members) // 2])
    gone |= set(ids[:200][::17])
    keep = [i for i in range(240) if ids[i] not in gone]
    pool = write_embeddings(str(tmp_path / "pool"), x[keep], ids[keep])
    m = _extend(tmp_path / "c_old", pool, tmp_path / "c_ext")
    ext = _clusters(str(tmp_path / "c_ext"))
    assert set(ext) == set(ids[keep]) and not gone & set(ext)
    assert m["extension"]["removed"] == len(gone) and m["extension"]["emptied_clusters"] >= 1
    assert m["counts"]["points"] == len(keep)
    assert whole not in _state(str(tmp_path / "c_ext"))
    _check_state(str(tmp_path / "c_ext"), dict(zip(ids, x)), "cosine")


def test_duplicate_ids_between_old_and_new_fail_naming_the_id(tmp_path):
    x = gaussian_blobs(120, 6, 10, spread=0.12, seed=7).astype(np.float32)
    ids = _ids("ex", 120)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:100], ids[:100]), tmp_path / "c_old")
    # ex-00042 is clustered, and arrives again as a "new" row with another embedding.
    pool_ids = np.r_[ids, ["ex-00042"]]
    pool = write_embeddings(str(tmp_path / "pool"), np.vstack([x, x[110:111]]), pool_ids)
    with pytest.raises(InputError, match="ex-00042"):
        _extend(tmp_path / "c_old", pool, tmp_path / "c_ext")
    assert not os.path.exists(tmp_path / "c_ext" / "manifest.json")


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_extension(tmp_path):
    x = gaussian_blobs(400, 6, 25, spread=0.12, seed=8).astype(np.float32)
    ids = _ids("ex", 400)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:330], ids[:330]), tmp_path / "c_old")
    keep = np.r_[np.arange(10, 400)]  # 10 removed, 70 new
    pool = write_embeddings(str(tmp_path / "pool"), x[keep], ids[keep])
    # Few in-memory edges: the distributed rounds run too.
    flags = ["--max_inmemory_edges", "40", "--num_shards", "4"]
    m1 = _extend(tmp_path / "c_old", pool, tmp_path / "w1", flags, workers=1)
    m2 = _extend(tmp_path / "c_old", pool, tmp_path / "w2", flags, workers=2)
    assert m1["extension"] == {**m2["extension"], "source": m1["extension"]["source"]}
    assert m1["extension"]["merges"] > 0
    for kind in ("clusters", "merges", "state"):
        t1 = _table(str(tmp_path / "w1"), kind)
        t2 = _table(str(tmp_path / "w2"), kind)
        keys = [(t1.column_names[0], "ascending"), (t1.column_names[1], "ascending")]
        assert t1.sort_by(keys).equals(t2.sort_by(keys)), kind  # bit-identical, float sums included


def test_extension_flags_fail_before_any_work(tmp_path):
    x = gaussian_blobs(60, 4, 5, spread=0.1, seed=9).astype(np.float32)
    emb = write_embeddings(str(tmp_path / "emb"), x, _ids("ex", 60))
    with pytest.raises(InputError, match="--distance_threshold: not used with --extend"):
        build_clusters.run(["--extend", str(tmp_path), "--embeddings", emb, "--distance_threshold", "0.1",
                            "--output_dir", str(tmp_path / "o")] + beam_args())
    with pytest.raises(InputError, match="--extend: .* has no manifest.json"):
        _extend(tmp_path, emb, tmp_path / "o")
    build_clusters.run(["--embeddings", emb, "--target_mean_cluster_size", "3", "--max_distance", "0.3",
                        "--output_dir", str(tmp_path / "t")] + beam_args())
    with pytest.raises(InputError, match="cut below its max_distance"):
        _extend(tmp_path / "t", emb, tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")


def test_extension_manifest_fields_are_documented(tmp_path):
    """docs/reference.md, '### cm-cluster --extend manifest.json': exactly the `extension`
    keys, and every other key is one of a clustering's manifest."""
    from test_reference_docs import documented_fields

    x = gaussian_blobs(80, 4, 6, spread=0.1, seed=10).astype(np.float32)
    ids = _ids("ex", 80)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:70], ids[:70]), tmp_path / "c_old")
    _extend(tmp_path / "c_old", write_embeddings(str(tmp_path / "pool"), x, ids), tmp_path / "c_ext")
    with open(tmp_path / "c_ext" / "manifest.json") as f:
        manifest = json.load(f)
    documented = documented_fields("cm-cluster --extend manifest.json")
    assert documented == {"extension"} | {f"extension.{k}" for k in manifest["extension"]}
    clustering = {f.split(".")[0] for f in documented_fields("cm-cluster manifest.json")}
    assert set(manifest) - {"extension"} <= clustering
    assert set(manifest["outputs"]) == {"clusters", "merges", "rejected", "state"}


def test_extension_counts_from_the_hac_nodes():
    # Nodes: old A, old B, new p, q, r, s. A+p, B merged with A (via q), r+s alone.
    final = np.array([1, 1, 1, 1, 7, 7])
    is_old = np.array([True, True, False, False, False, False])
    c = ek.extension_counts(final, is_old, np.ones(6, np.int64))
    assert c == {"joined_existing": 2, "new_clusters": 1, "existing_merged": 1}


def test_recompute_state_takes_the_sums_from_the_current_embeddings(tmp_path):
    """After a new model every kept example's vector changed: with --extend_recompute_state
    the existing clusters' sums are their members' current vectors (and without it, the
    stored ones: the untouched clusters' state rows are the source's, bit for bit)."""
    x = gaussian_blobs(200, 6, 12, spread=0.12, seed=11).astype(np.float32)
    ids = _ids("ex", 200)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:180], ids[:180]), tmp_path / "c_old")
    today = (x + 0.01 * np.random.default_rng(0).normal(size=x.shape)).astype(np.float32)
    pool = write_embeddings(str(tmp_path / "pool"), today, ids)
    _extend(tmp_path / "c_old", pool, tmp_path / "c_re", ["--extend_recompute_state"])
    _check_state(str(tmp_path / "c_re"), dict(zip(ids, today)), "cosine")
    m = _extend(tmp_path / "c_old", pool, tmp_path / "c_stored")
    old_state, stored = _state(str(tmp_path / "c_old")), _state(str(tmp_path / "c_stored"))
    untouched = m["clusters"] - m["extension"]["new_clusters"] - (m["extension"]["touched_clusters"]
                                                                   - m["extension"]["existing_merged"])
    same = [c for c in stored if c in old_state and stored[c][0] == old_state[c][0]
            and np.array_equal(stored[c][1], old_state[c][1])]
    assert len(same) >= untouched > 0


def test_partitioned_cluster_candidates_probe_their_partitions():
    rng = np.random.default_rng(12)
    for metric in ("cosine", "sqeuclidean"):
        m, d = 300, 6
        sums = rng.normal(size=(m, d)) * 3
        counts = rng.integers(1, 5, m)
        sq = (sums ** 2).sum(1) / counts + rng.random(m)  # any q >= |s|^2 / n
        labels = rng.integers(1 << 40, 1 << 62, m)
        nodes = Clusters(ek.node_ids(labels, 4), counts, sums, sq, labels).sorted()
        x = rng.normal(size=(50, d))
        if metric == "cosine":
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(50, dtype=np.int64)
        eps = 1.2 if metric == "cosine" else 20.0
        parts = ek.partition_clusters(nodes, metric, 12)
        # Every partition probed: the exhaustive search.
        full = ek.cluster_candidates(x, ids, nodes, 4, metric, eps)
        every = ek.cluster_candidates_partitioned(x, ids, nodes, parts, 4, metric, eps, 12)
        assert len(full[0]) > 50
        assert np.array_equal(full[0], every[0]) and np.array_equal(full[1], every[1])
        # Two probes: each point's candidates are the exhaustive search's over the clusters
        # of its two nearest partitions.
        src, dst = ek.cluster_candidates_partitioned(x, ids, nodes, parts, 4, metric, eps, 2)
        xd = (x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x).astype(np.float32)
        probes = kk.nearest_centroids(xd, parts["centroids"], 2)
        for i in range(50):
            near = nodes.take(np.flatnonzero(np.isin(parts["part"], probes[i])))
            _, want = ek.cluster_candidates(x[i:i + 1], ids[i:i + 1], near, 4, metric, eps)
            assert list(dst[src == i]) == list(want)


def test_an_extended_clustering_recuts_to_itself_and_extends_again(tmp_path):
    """Its merge hierarchy is the source's plus this run's merges: cut at its eps it gives
    back its clusters, and it can be extended again."""
    x = gaussian_blobs(220, 6, 15, spread=0.12, seed=13).astype(np.float32)
    ids = _ids("ex", 220)
    _cluster(write_embeddings(str(tmp_path / "old"), x[:180], ids[:180]), tmp_path / "c0")
    m1 = _extend(tmp_path / "c0", write_embeddings(str(tmp_path / "p1"), x[:200], ids[:200]), tmp_path / "c1")
    build_clusters.run(["--recut_from", str(tmp_path / "c1"), "--distance_threshold", str(EPS),
                        "--output_dir", str(tmp_path / "recut")] + beam_args())
    assert _clusters(str(tmp_path / "recut")) == _clusters(str(tmp_path / "c1"))
    m2 = _extend(tmp_path / "c1", write_embeddings(str(tmp_path / "p2"), x, ids), tmp_path / "c2")
    assert m2["extension"]["new_examples"] == 20 and m2["counts"]["points"] == 220
    assert m2["rounds"] == m1["rounds"] + m2["extension"]["rounds"]
    _check_state(str(tmp_path / "c2"), dict(zip(ids, x)), "cosine")


def test_nightly_extends_a_grown_pool_and_reclusters_above_the_fraction(tmp_path):
    """cm-nightly's decision for a clustering built from other embeddings (pipelines.nightly._growth)."""
    import argparse

    from cm_beam.io import artifacts
    from cm_beam.nightly import work_dir as nw
    from pipelines import nightly

    def clustering(name, points, **cut):
        d = str(tmp_path / name)
        manifest = {"stage": "cluster", "counts": {"points": points}, "max_distance": 0.1,
                    "outputs": {"clusters": "clusters-*.parquet", "state": "state-*.parquet"},
                    "cut": {"rule": "distance", "requested": 0.1, "distance_threshold": 0.1, **cut}}
        artifacts.write_manifest(d, manifest)
        return nw.CompleteDir(d, artifacts.read_manifest(d))

    today = nw.CompleteDir(str(tmp_path / "emb"), {"counts": {"embedded": 1000}})
    args = argparse.Namespace(recluster_fraction=0.25)
    action, why = nightly._growth(args, clustering("a", 1000), today)
    assert action == "cached" and "did not grow" in why
    action, why = nightly._growth(args, clustering("b", 800), today)
    assert action == "extend" and "grew by 200 examples (20.0%" in why
    action, why = nightly._growth(args, clustering("c", 700), today)
    assert action == "recluster" and "300 new examples are 30.0%" in why and "--recluster_fraction 0.25" in why
    action, why = nightly._growth(args, clustering("d", 900, rule="target", distance_threshold=0.05), today)
    assert action == "recluster" and "cannot be extended" in why
    assert nightly.build_parser().parse_args(["--work_dir", "w"]).recluster_fraction == nightly.DEFAULT_RECLUSTER_FRACTION
