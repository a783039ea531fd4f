"""cm-cluster end to end: exactness against scipy, quality with default flags, ivf
recall, bad inputs, output-directory rules, determinism over workers and sharding."""

import json
import os
import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.metrics import adjusted_rand_score

from cm_beam.io import artifacts
from cm_beam.io import table_io
from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.clustering.build_clusters import CLUSTERS_SCHEMA, BuildClusters
from cm_beam.errors import InputError
from cm_beam.clustering.knn_graph import KnnGraph
from cm_beam.testing import reference_kernels
from pipelines import build_clusters
from tests.conftest import DATAFLOW_DRY_RUN, beam_args, gaussian_blobs, write_embeddings
from tests.test_hac_kernels import gap_thresholds, same_partition


def blobs(n=1500, d=16, k=15, spread=0.35, seed=0):
    return gaussian_blobs(n, d, k, spread, seed).astype(np.float32)


def ids_for(n):
    return [f"img-{i:05d}" for i in range(n)]


def read_labels(out_dir, ids):
    t = table_io.read_table(os.path.join(out_dir, "clusters-*.parquet"))
    got = dict(zip(t.column("example_id").to_pylist(), t.column("cluster_id").to_pylist()))
    sizes = dict(zip(t.column("example_id").to_pylist(), t.column("cluster_size").to_pylist()))
    assert t.num_rows == len(got), "an example_id appears twice in the output"
    assert t.schema.field("cluster_id").type == pa.int64()
    return np.array([got[i] for i in ids]), np.array([sizes[i] for i in ids])


def scipy_reference(x, metric):
    xx = x.astype(np.float64)
    if metric == "cosine":
        xx = kk.normalise_rows(xx)[0]
    return linkage(xx, "average", metric=metric)


def cm_cluster(pattern, out_dir, eps, *flags, workers=1):
    return build_clusters.run(["--embeddings", pattern, "--output_dir", str(out_dir), "--distance_threshold", str(eps),
                               *map(str, flags)] + beam_args(workers))


@pytest.mark.slow  # the same exactness at kernel level runs fast: test_hac_kernels.py
def test_exact_partition_equals_scipy_with_all_pairs_as_candidates(tmp_path):
    """k = n - 1: every pair is a candidate, so the partition must be scipy's exactly.
    Several eps per metric in one pipeline; some run distributed rounds, others the
    in-memory finish."""
    x = blobs()
    n = len(x)
    ids = ids_for(n)
    batches = [pa.record_batch({"example_id": pa.array(ids[s:s + 300]),
                                "embedding": pa.array(list(x[s:s + 300]), pa.list_(pa.float32()))})
               for s in range(0, n, 300)]
    cases = []
    refs = {}
    for metric, targets in (("cosine", (0.08, 0.3, 0.6)), ("sqeuclidean", (1.5, 6.0, 20.0))):
        z = scipy_reference(x, metric)
        for j, eps in enumerate(gap_thresholds(z[:, 2], targets)):
            # The middle eps of each metric runs 4 (or 5) distributed rounds, then finishes in
            # memory: the in-memory bound is the edge count the (identical) sequential
            # rounds have left after 4 rounds.
            bound = None
            if j == 1:
                xx = kk.prepared_vectors({"vecs": x, "normalise": metric == "cosine",
                                          "center": x.astype(np.float64).mean(0)})
                c = hk.Clusters(np.arange(n), np.ones(n, np.int64), xx, np.einsum("ij,ij->i", xx, xx), np.arange(n))
                u, v = np.triu_indices(n, 1)
                stats = hk.hac_in_memory(c, u, v, eps, metric)[2]
                assert len(stats) > 5
                bound = stats[4].edges
            cases.append((metric, eps, bound))
            refs[(metric, eps)] = fcluster(z, eps, "distance")
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(beam_args(1))) as p:
        pool = p | beam.Create(batches)
        for i, (metric, eps, bound) in enumerate(cases):
            out = pool | f"Cluster{i}" >> BuildClusters(
                distance_threshold=eps, metric=metric, num_neighbors=n - 1, knn_mode="exact", num_shards=4,
                max_rounds=5 if bound else 0, max_inmemory_edges=bound if bound else 10**9)
            out["clusters"] | f"Write{i}" >> table_io.WriteTableBlocks(str(tmp_path / f"c{i}" / "clusters"), CLUSTERS_SCHEMA)
            out["summary"] | f"Summary{i}" >> beam.Map(
                lambda s, i=i: json.dump(s, open(str(tmp_path / f"summary{i}.json"), "w"), default=int))
    for i, (metric, eps, bound) in enumerate(cases):
        got, sizes = read_labels(str(tmp_path / f"c{i}"), ids)
        ref = refs[(metric, eps)]
        assert same_partition(got, ref), (metric, eps, bound)
        assert (got >= 0).all()
        assert np.array_equal(sizes, np.bincount(ref)[ref])
        summary = json.load(open(str(tmp_path / f"summary{i}.json")))
        assert summary["clusters"] == len(np.unique(ref)) and summary["n"] == n
        if bound:
            # The route counts edges before duplicates drop (an upper bound), so the
            # finish may start one round after the exact count would allow.
            assert len(summary["beam_rounds"]) in (4, 5) and all(r["merges"] > 0 for r in summary["beam_rounds"])
            assert summary["inmemory_rounds"]
        assert 1 < len(np.unique(ref)) < n  # a threshold that actually cuts the tree


def test_default_flags_quality_and_manifest(tmp_path):
    """Default k on clusters bigger than k: ARI >= 0.95 against exact HAC; manifest contract."""
    x = blobs(1500, k=5, spread=0.5, seed=2)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, fixed=True)
    z = scipy_reference(x, "cosine")
    eps = gap_thresholds(z[:, 2], [0.3])[0]
    manifest = cm_cluster(pattern, tmp_path / "out", eps)
    got, _ = read_labels(str(tmp_path / "out"), ids)
    ref = fcluster(z, eps, "distance")
    assert adjusted_rand_score(ref, got) >= 0.95
    on_disk = artifacts.read_manifest(str(tmp_path / "out"))
    assert on_disk["clusters"] == manifest["clusters"] == len(np.unique(got))
    for key in ("parameters", "n", "clusters", "size_histogram", "rounds", "beam_rounds", "inmemory_rounds",
                "knn_recall", "timings", "input_fingerprint", "counts"):
        assert key in on_disk, key
    params = on_disk["parameters"]
    assert params["distance_threshold"] == eps and params["metric"] == "cosine" and params["knn_mode_used"] == "exact"
    assert sum(on_disk["size_histogram"].values()) == on_disk["clusters"]
    assert on_disk["counts"]["points"] == len(x) and on_disk["counts"]["rejected"] == 0
    assert len(on_disk["input_fingerprint"]["digest"]) == 16
    assert not [f for f in artifacts.list_files(str(tmp_path / "out")) if "_summary" in f]


def test_ivf_recall_against_exact(tmp_path):
    """IVF kNN: recall@k >= 0.9 against brute force, and the pipeline's own estimate agrees."""
    x = kk.normalise_rows(blobs(3000, k=6, spread=0.6, seed=4))[0].astype(np.float32)
    n, k = len(x), 20
    ids = np.arange(n, dtype=np.int64) + 10
    centroids = kk.kmeans(x[::3], 12, 8, seed=1)
    sample_rows = np.arange(0, n, 25)
    sample = {"ids": ids[sample_rows], "vecs": x[sample_rows]}
    blocks = [(s, {"ids": ids[s::4], "vecs": x[s::4], "normalise": False}) for s in range(4)]
    # Shard of every id: 0 (shard_of reads the high bits, zero here).
    def save(value, name):  # DoFns run on pickled copies: results go through files
        with open(str(tmp_path / name), "wb") as f:
            pickle.dump(value, f)

    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(beam_args(1))) as p:
        graph = p | beam.Create(blocks) | KnnGraph(
            k, "cosine", "ivf", num_shards=4, num_probes=3,
            centroids=beam.pvalue.AsSingleton(p | "C" >> beam.Create([centroids])),
            sample=beam.pvalue.AsSingleton(p | "S" >> beam.Create([sample])))
        graph["edges"] | beam.combiners.ToList() | beam.Map(save, "edges.pkl")
        graph["recall"] | "R" >> beam.Map(save, "recall.pkl")
    result = {name: pickle.load(open(str(tmp_path / f"{name}.pkl"), "rb")) for name in ("edges", "recall")}
    src = np.concatenate([e[1]["src"] for e in result["edges"]])
    dst = np.concatenate([e[1]["dst"] for e in result["edges"]])
    exact_ids, _ = reference_kernels.brute_force_topk(x, ids, k, "cosine")
    hits = 0
    for row in range(n):
        hits += len(np.intersect1d(dst[src == ids[row]], exact_ids[row]))
    recall = hits / (n * k)
    assert recall >= 0.9
    assert abs(result["recall"]["recall_at_k"] - recall) < 0.05
    assert result["recall"]["recall_queries"] == len(sample_rows)


@pytest.mark.slow
def test_ivf_with_every_partition_allowed_gives_the_exact_candidate_partition(tmp_path):
    """cm-cluster end to end: ivf with --num_probes = --num_partitions searches every
    partition the boundary bound allows, so its clusters are the exact-candidate ones."""
    x = blobs(1500, k=12, spread=0.5, seed=9)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=2)
    labels = {}
    for mode, flags in (("exact", ["--knn_mode", "exact"]),
                        ("ivf", ["--knn_mode", "ivf", "--num_partitions", 5, "--num_probes", 5])):
        manifest = cm_cluster(pattern, tmp_path / mode, 0.3, "--num_neighbors", 15, *flags)
        assert manifest["parameters"]["knn_mode_used"] == mode
        labels[mode], _ = read_labels(str(tmp_path / mode), ids)
    assert manifest["knn_recall"]["recall_at_k"] == 1.0
    assert same_partition(labels["exact"], labels["ivf"])
    assert 20 < len(np.unique(labels["exact"])) < len(x) // 2


@pytest.mark.slow
def test_exact_knn_graph_equals_brute_force(tmp_path):
    """Exact mode (own-shard lists, bounded pair candidates, per-shard merge) gives
    each point exactly its brute-force top-k within max_dist, in 2 worker processes."""
    x = kk.normalise_rows(blobs(1200, k=5, spread=0.5, seed=6))[0].astype(np.float32)
    n, k, eps = len(x), 25, 0.35
    rng = np.random.default_rng(2)
    # Spatial shards as in cm-cluster (tight bounds); shard 3 empty, shard 4 40 points of anywhere.
    shards = kk.nearest_centroids(x, kk.kmeans(x, 3, 5, seed=1), 1)[:, 0]
    shards[rng.choice(n, 40, replace=False)] = 4
    ids = hk.make_ids(shards, rng.choice(1 << 40, n, replace=False).astype(np.uint64) << np.uint64(24))
    blocks = [(s, {"ids": ids[shards == s], "vecs": x[shards == s], "normalise": False})
              for s in np.unique(shards)]

    def save(value, name):
        with open(str(tmp_path / name), "wb") as f:
            pickle.dump(value, f)

    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(beam_args(2))) as p:
        graph = p | beam.Create(blocks) | KnnGraph(k, "cosine", "exact", num_shards=5, max_dist=eps)
        graph["edges"] | beam.combiners.ToList() | beam.Map(save, "edges.pkl")
    edges = pickle.load(open(str(tmp_path / "edges.pkl"), "rb"))
    assert all((hk.shard_of(e["src"]) == s).all() for s, e in edges)
    got = [np.concatenate([e[name] for _, e in edges]) for name in ("src", "dst", "dist")]
    want = kk.dense_to_edges(ids, *kk.block_topk(x, ids, x, ids, k, "cosine", eps))
    got_order, want_order = np.lexsort((got[1], got[0])), np.lexsort((want[1], want[0]))
    assert len(got[0]) == len(want[0]) > n
    assert np.array_equal(got[0][got_order], want[0][want_order])
    assert np.array_equal(got[1][got_order], want[1][want_order])
    np.testing.assert_allclose(got[2][got_order], want[2][want_order], atol=1e-5)


def test_bad_rows_are_rejected_with_reasons(tmp_path):
    x = blobs(300, k=5, seed=6)
    ids = ids_for(len(x))
    x[3] = np.nan
    x[7, 2] = np.inf
    x[11] = 0.0
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=2)
    manifest = cm_cluster(pattern, tmp_path / "out", 0.2)
    rejected = table_io.read_table(str(tmp_path / "out" / "rejected-*.parquet"))
    assert dict(zip(rejected.column("example_id").to_pylist(), rejected.column("reason").to_pylist())) == {
        ids[3]: "non_finite", ids[7]: "non_finite", ids[11]: "zero_vector"}
    assert manifest["counts"]["rejected"] == 3 and manifest["counts"]["points"] == 297
    assert manifest["rejected_by_reason"] == {"non_finite": 2, "zero_vector": 1}
    clusters = table_io.read_table(str(tmp_path / "out" / "clusters-*.parquet"))
    assert clusters.num_rows == 297 and ids[3] not in clusters.column("example_id").to_pylist()
    # sqeuclidean accepts a zero vector (it is a point like any other).
    manifest = cm_cluster(pattern, tmp_path / "out2", 1.0, "--metric", "sqeuclidean")
    assert manifest["counts"]["rejected"] == 2


@pytest.mark.slow
def test_ragged_and_duplicate_ids_fail_without_manifest(tmp_path):
    out = tmp_path / "out"
    x = blobs(200, seed=7)
    ids = ids_for(len(x))
    good = write_embeddings(str(tmp_path / "good"), x, ids, files=1)
    cm_cluster(good, out, 0.2)
    assert artifacts.read_manifest(str(out)) is not None
    # Ragged: named by example_id; the old manifest is gone, no new one.
    ragged_dir = tmp_path / "ragged"
    os.makedirs(ragged_dir)
    emb = [list(map(float, r)) for r in x[:20]]
    emb[13] = emb[13][:5]
    pq.write_table(pa.table({"example_id": ids[:20], "embedding": emb}), str(ragged_dir / "a.parquet"))
    with pytest.raises(InputError, match=ids[13]):
        cm_cluster(str(ragged_dir / "*.parquet"), out, 0.2, "--overwrite")
    assert artifacts.read_manifest(str(out)) is None
    # Ragged across files (each file consistent on its own), with 2 workers.
    pq.write_table(pa.table({"example_id": ["other-1", "other-2"], "embedding": [[1.0, 2.0], [2.0, 1.0]]}),
                   str(ragged_dir / "a.parquet"))
    pq.write_table(pa.table({"example_id": ids[:3], "embedding": [list(map(float, r)) for r in x[:3]]}),
                   str(ragged_dir / "b.parquet"))
    with pytest.raises(InputError, match="other-1|img-0000"):
        cm_cluster(str(ragged_dir / "*.parquet"), out, 0.2, "--overwrite", workers=2)
    # Duplicate ids across files.
    dup_dir = tmp_path / "dup"
    write_embeddings(str(dup_dir), x, ids[:100] + ids[:100], files=2)
    with pytest.raises(InputError, match=r"duplicate example_id 'img-000"):
        cm_cluster(str(dup_dir / "*.parquet"), out, 0.2, "--overwrite")
    # More candidate edges than one worker may finish in memory, with no rounds left.
    with pytest.raises(RuntimeError, match=r"--max_rounds=0 rounds, more than --max_inmemory_edges=50 "):
        cm_cluster(good, out, 0.2, "--overwrite", "--max_rounds", "0", "--max_inmemory_edges", "50")
    assert artifacts.read_manifest(str(out)) is None
    assert artifacts.read_manifest(str(out)) is None


def test_flag_and_directory_errors(tmp_path, capsys):
    x = blobs(50, seed=8)
    ids = ids_for(len(x))
    pattern = write_embeddings(str(tmp_path / "in"), x, ids, files=1)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "stale.txt").write_text("x")
    with pytest.raises(InputError, match="--output_dir"):
        cm_cluster(pattern, out, 0.2)
    for flags in (["--distance_threshold", "-1"], ["--distance_threshold", "nan"], ["--metric", "euclid"],
                  ["--num_neighbors", "0"], ["--knn_mode", "lsh"]):
        argv = ["--embeddings", pattern, "--output_dir", str(tmp_path / "o2"), "--distance_threshold", "0.2"] + flags
        with pytest.raises(SystemExit):
            build_clusters.run(argv)
        assert flags[0] in capsys.readouterr().err
    with pytest.raises(InputError, match="--distance_threshold"):
        BuildClusters(distance_threshold=2.5, metric="cosine")
    with pytest.raises(InputError, match="--num_probes"):
        BuildClusters(distance_threshold=0.2, num_probes=0)
    # A cap above the partition count is no cap (the default 6 with --num_partitions 4).
    assert BuildClusters(distance_threshold=0.2, num_partitions=4).params["num_probes"] == 6
    pq.write_table(pa.table({"example_id": ["a"], "vec": [[1.0]]}), str(tmp_path / "nocol.parquet"))
    with pytest.raises(InputError, match="nocol.parquet.*embedding"):
        cm_cluster(str(tmp_path / "nocol.parquet"), tmp_path / "o3", 0.2)
    assert not os.path.exists(tmp_path / "o3" / "manifest.json")


@pytest.mark.slow
def test_same_cluster_ids_with_one_or_two_workers_and_any_sharding(tmp_path):
    x = blobs(1200, k=12, seed=9)
    ids = ids_for(len(x))
    a = write_embeddings(str(tmp_path / "a"), x, ids, files=1, row_group=1200)
    perm = np.random.default_rng(0).permutation(len(x))
    b = write_embeddings(str(tmp_path / "b"), x[perm], [ids[i] for i in perm], files=4, row_group=100)
    m1 = cm_cluster(a, tmp_path / "o1", 0.3, "--num_shards", "4", workers=1)
    # Other files, order, shards and worker count; distributed rounds instead of in memory.
    m2 = cm_cluster(b, tmp_path / "o2", 0.3, "--num_shards", "7", "--max_inmemory_edges", "15000",
                    "--max_rounds", "6", workers=2)
    l1, s1 = read_labels(str(tmp_path / "o1"), ids)
    l2, s2 = read_labels(str(tmp_path / "o2"), ids)
    assert np.array_equal(l1, l2) and np.array_equal(s1, s2)
    assert len(m2["beam_rounds"]) >= 2 and m2["inmemory_rounds"] and not m1["beam_rounds"]
    assert m1["input_fingerprint"]["digest"] == m2["input_fingerprint"]["digest"]
    assert 1 < len(np.unique(l1)) < len(x)


@pytest.mark.slow
def test_dataflow_dry_run_builds_the_job_but_writes_no_manifest(tmp_path):
    pytest.importorskip("google.cloud.dataflow_v1beta3")
    from cm_beam.runtime.runner import JobNotExecuted

    x = blobs(n=60, d=8, k=3)
    path = str(tmp_path / "embeddings.parquet")
    pq.write_table(pa.table({"example_id": [f"e{i}" for i in range(len(x))],
                             "embedding": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32()))}), path)
    out = tmp_path / "out"
    with pytest.raises(JobNotExecuted, match="--dry_run"):
        build_clusters.run(["--embeddings", path, "--distance_threshold", "0.3", "--output_dir", str(out)] + DATAFLOW_DRY_RUN)
    assert not (out / "manifest.json").exists()


def test_directed_edge_bound_is_an_upper_bound_and_exact_inside_shards():
    from cm_beam.clustering.hac import _directed_bound, _directed_unique, _symmetric_edges

    rng = np.random.default_rng(3)
    shards = rng.integers(0, 3, 400)
    ids = hk.make_ids(shards, rng.integers(1, 2**62, 400).astype(np.uint64))
    src_i, dst_i = rng.integers(0, 400, 3000), rng.integers(0, 400, 3000)
    blocks = []
    for s in range(3):
        m = shards[src_i] == s
        blocks.append((s, {"src": ids[src_i[m]], "dst": ids[dst_i[m]]}))

    def exact(blocks):
        per_shard = {}
        for b in blocks:
            for shard, (_, (src, dst)) in _symmetric_edges(b):
                per_shard.setdefault(shard, []).append((src, dst))
        return sum(len(_directed_unique(np.concatenate([a for a, _ in p]), np.concatenate([b for _, b in p]))[0])
                   for p in per_shard.values())

    assert sum(_directed_bound(b) for b in blocks) >= exact(blocks)
    inside = [(s, {"src": b["src"][hk.shard_of(b["dst"]) == s], "dst": b["dst"][hk.shard_of(b["dst"]) == s]})
              for s, b in blocks]
    assert sum(_directed_bound(b) for b in inside) == exact(inside)
