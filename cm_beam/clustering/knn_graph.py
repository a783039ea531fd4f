"""The sharded k-nearest-neighbour graph as a Beam PTransform.

Input: one block per spatial shard, `(shard, {"ids": int64 [m], "vecs": float32 [m, d],
"normalise": bool, "center": float64 [d] or None})`: raw rows and how to prepare them
(`knn_kernels.prepared_vectors`: L2-normalised for cosine, centred for sqeuclidean). Output: each
point's k nearest neighbours as edge blocks keyed by the shard of the source point,
`(shard, {"src", "dst", "dist"})`, optionally cut at `max_dist` (the clustering only
needs candidates within eps: the top-k cut at eps equals the top-k of the points
within eps).

Two modes:

* `exact`: each shard first finds its points' top-k inside itself; the k-th distance
  found there bounds what any other shard can contribute. Every other shard pair
  (i < j) is one element: one distance matrix gives both directions' candidates
  under those bounds (few, as spatial shards hold most neighbours). A point's own
  list and its candidates are merged per shard. Work n^2 d / 2, data shipped
  num_shards x the pool: for small pools.
* `ivf`: coarse k-means centroids (computed on a sample, a side input); each point is
  sent to its `num_probes` nearest partitions, brute force inside each partition,
  partial lists merged per point. Two points are candidates when they share a
  partition. The recall of this against exact search is estimated on a fixed sample
  of query points (`recall` output).

The per-block math is in `cm_beam.clustering.knn_kernels` (pure numpy).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from cm_beam.clustering import knn_kernels as kk
from cm_beam.array_ops import unique_sorted
from cm_beam.clustering.hac_kernels import hash_part, shard_of

MODES = ("exact", "ivf")


class _Timer:
    """Adds the wall time spent in a block to a Beam counter (milliseconds)."""

    def __init__(self, name: str):
        self._counter = Metrics.counter("cm_cluster", f"ms_{name}")

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._counter.inc(int(1000 * (time.perf_counter() - self._t)))
        return False


def _edge_block(src, dst, dist) -> Dict[str, np.ndarray]:
    return {"src": np.asarray(src, np.int64), "dst": np.asarray(dst, np.int64), "dist": np.asarray(dist, np.float32)}


def _split_by_shard(src, dst, dist):
    """Edge arrays -> [(shard of src, edge block)]."""
    shards = shard_of(src)
    out = []
    for s in unique_sorted(shards):
        m = shards == s
        out.append((int(s), _edge_block(src[m], dst[m], dist[m])))
    return out


class _MergeSampleTopk(beam.CombineFn):
    """Merges partial top-k lists of the recall sample's query rows."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return None

    def add_input(self, acc, part):
        return self.merge_accumulators([acc, part])

    def merge_accumulators(self, accs):
        rows, ids, dists = [], [], []
        for a in accs:
            if a is not None:
                rows.append(a[0]); ids.append(a[1]); dists.append(a[2])
        if not rows:
            return None
        rows = np.concatenate(rows); ids = np.concatenate(ids); dists = np.concatenate(dists)
        src, dst, dist = kk.dense_to_edges(rows, ids, dists)
        src, dst, dist = kk.topk_edges(src, dst, dist, self._k)
        uniq = unique_sorted(rows)
        out_ids = np.full((len(uniq), self._k), kk.PAD_ID, np.int64)
        out_d = np.full((len(uniq), self._k), np.inf, np.float32)
        if len(src):
            r = np.searchsorted(uniq, src)
            starts = np.ones(len(src), bool)
            starts[1:] = src[1:] != src[:-1]
            col = np.arange(len(src)) - np.maximum.accumulate(np.where(starts, np.arange(len(src)), 0))
            out_ids[r, col] = dst
            out_d[r, col] = dist
        return uniq, out_ids, out_d

    def extract_output(self, acc):
        return acc


def _exact_own_topk(kv, k, metric, max_dist, num_shards):
    """Shard i against itself: its points' top-k inside the shard (final edges for the
    merge) and, for every other shard j, the points with their k-th distance as a bound
    (key (min(i, j), max(i, j))). Spatial shards hold most of a point's neighbours, so
    the bound is tight and few pairs from other shards survive it."""
    shard, block = int(kv[0]), kv[1]
    prep = kk.prepared_vectors(block, np.float32)
    with _Timer("knn"):
        nb, nd = kk.block_topk(prep, block["ids"], prep, block["ids"], k, metric, max_dist)
        src, dst, dist = kk.dense_to_edges(block["ids"], nb, nd)
    yield beam.pvalue.TaggedOutput("own", (shard, _edge_block(src, dst, dist)))
    part = {"ids": block["ids"], "prep": prep, "bound": kk.kth_distance(nd)}
    for other in range(num_shards):
        if other != shard:
            yield (min(shard, other), max(shard, other)), (shard, part)


def _exact_pair_candidates(kv, k, metric, max_dist):
    """Shard pair (i < j): one distance matrix, candidates of both directions."""
    _, parts = kv
    parts = dict(parts)
    if len(parts) < 2:
        return  # the other shard is empty
    (i, a), (j, b) = sorted(parts.items())
    with _Timer("knn"):
        to_j, to_i = kk.pair_candidates(a["prep"], a["ids"], a["bound"], b["prep"], b["ids"], b["bound"],
                                        k, metric, max_dist)
    yield i, _edge_block(*to_j)
    yield j, _edge_block(*to_i)


def _ivf_assign(kv, centroids, num_probes):
    _, block = kv
    with _Timer("knn"):
        vecs = kk.prepared_vectors(block, np.float32)
        probes = kk.nearest_centroids(vecs, centroids, num_probes)
        part = probes.ravel()
        rows = np.repeat(np.arange(len(vecs)), probes.shape[1])
        order = np.argsort(part, kind="stable")
        part, rows = part[order], rows[order]
        bounds = np.flatnonzero(np.diff(part)) + 1
        out = []
        for seg in np.split(np.arange(len(part)), bounds):
            if len(seg) == 0:
                continue
            r = rows[seg]
            out.append((int(part[seg[0]]), {"ids": block["ids"][r], "vecs": vecs[r]}))
    return out


def _ivf_partition_topk(kv, k, metric, max_dist, sample):
    _, parts = kv
    with _Timer("knn"):
        ids = np.concatenate([p["ids"] for p in parts])
        vecs = np.concatenate([p["vecs"] for p in parts])
        nb, nd = kk.block_topk(vecs, ids, vecs, ids, k, metric, max_dist)
        # Sample points (matched by the shard-independent part of their ids) also get
        # their uncut lists, for the recall estimate.
        if sample is not None and len(sample["ids"]):
            low = hash_part(ids)
            pos = np.searchsorted(sample["ids"], low)
            pos_c = np.minimum(pos, len(sample["ids"]) - 1)
            hit = sample["ids"][pos_c] == low
            if hit.any():
                snb, snd = kk.block_topk(vecs[hit], ids[hit], vecs, ids, k, metric)
                nb_low = np.where(snb >= 0, hash_part(snb), kk.PAD_ID)
                yield beam.pvalue.TaggedOutput("sample", (pos_c[hit], nb_low, snd))
        src, dst, dist = kk.dense_to_edges(ids, nb, nd)
    for item in _split_by_shard(src, dst, dist):
        yield item


def _merge_shard_edges(kv, k, distinct):
    shard, parts = kv
    with _Timer("knn"):
        parts = list(parts)
        src = np.concatenate([p["src"] for p in parts])
        dst = np.concatenate([p["dst"] for p in parts])
        dist = np.concatenate([p["dist"] for p in parts])
        src, dst, dist = kk.topk_edges(src, dst, dist, k, distinct=distinct)
    return shard, _edge_block(src, dst, dist)


def _sample_exact_topk(kv, sample, k, metric):
    _, block = kv
    if sample is None or not len(sample["ids"]):
        return
    with _Timer("knn_recall"):
        nb, nd = kk.block_topk(sample["vecs"].astype(np.float32), sample["ids"],
                               kk.prepared_vectors(block, np.float32), hash_part(block["ids"]), k, metric)
    yield np.arange(len(sample["ids"])), nb, nd


def _recall(exact, approx, max_dist):
    if exact is None or approx is None:
        return {"recall_at_k": None, "recall_within_eps": None, "recall_queries": 0}
    rows_e, ids_e, d_e = exact
    rows_a, ids_a, _ = approx
    pos = np.searchsorted(rows_a, rows_e)
    pos_c = np.minimum(pos, max(len(rows_a) - 1, 0))
    # Every point reaches at least one partition, so a sample query without an approximate
    # list is not a point of the graph: an exact duplicate folded into another point
    # (build_clusters). It is not a query.
    found = rows_a[pos_c] == rows_e
    approx_rows, ids_e, d_e = ids_a[pos_c[found]], ids_e[found], d_e[found]
    # Within eps: the neighbours that can be candidates at all (edges above eps are cut).
    within = np.where(d_e <= max_dist, ids_e, kk.PAD_ID)
    return {"recall_at_k": kk.recall_at_k(approx_rows, ids_e), "recall_within_eps": kk.recall_at_k(approx_rows, within),
            "recall_queries": int(found.sum())}


class KnnGraph(beam.PTransform):
    """Each point's k nearest neighbours, sharded; returns {"edges", "recall"}.

    Example:
        graph = shard_blocks | KnnGraph(k=100, metric="cosine", mode="ivf",
                                        num_shards=16, max_dist=0.2,
                                        centroids=beam.pvalue.AsSingleton(cents),
                                        sample=beam.pvalue.AsSingleton(sample))
        graph["edges"]   # (shard, {"src", "dst", "dist"}), top-k per src, cut at max_dist
        graph["recall"]  # one dict {"recall_at_k", "recall_queries"} (ivf only)
    """

    def __init__(self, k: int, metric: str, mode: str, num_shards: int, num_probes: int = 1,
                 max_dist: float = float("inf"), centroids=None, sample=None):
        super().__init__()
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        if metric not in kk.METRICS:
            raise ValueError(f"metric must be one of {kk.METRICS}, got {metric!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "ivf" and centroids is None:
            raise ValueError("ivf mode needs the centroids side input")
        self._k, self._metric, self._mode = k, metric, mode
        self._num_shards, self._num_probes = num_shards, num_probes
        self._max_dist = max_dist
        self._centroids, self._sample = centroids, sample

    def expand(self, points):
        k, metric, max_dist = self._k, self._metric, self._max_dist
        outputs = {}
        if self._mode == "exact":
            own = points | "OwnShardTopk" >> beam.FlatMap(
                _exact_own_topk, k, metric, max_dist, self._num_shards).with_outputs("own", main="pairs")
            cross = (
                own.pairs
                | "GroupShardPairs" >> beam.GroupByKey()
                | "PairCandidates" >> beam.FlatMap(_exact_pair_candidates, k, metric, max_dist)
            )
            partial = (own.own, cross) | "FlattenPartial" >> beam.Flatten()
        else:
            tagged = (
                points
                | "AssignPartitions" >> beam.FlatMap(_ivf_assign, self._centroids, self._num_probes)
                | "GroupPartitions" >> beam.GroupByKey()
                | "PartitionTopk" >> beam.FlatMap(_ivf_partition_topk, k, metric, max_dist, self._sample)
                .with_outputs("sample", main="edges")
            )
            partial = tagged.edges
            if self._sample is not None:
                approx = tagged.sample | "MergeSampleApprox" >> beam.CombineGlobally(_MergeSampleTopk(k))
                exact = (
                    points
                    | "SampleExact" >> beam.FlatMap(_sample_exact_topk, self._sample, k, metric)
                    | "MergeSampleExact" >> beam.CombineGlobally(_MergeSampleTopk(k))
                )
                outputs["recall"] = (
                    exact
                    | "Recall" >> beam.Map(_recall, beam.pvalue.AsSingleton(approx), max_dist)
                )
        outputs["edges"] = (
            partial
            | "GroupBySourceShard" >> beam.GroupByKey()
            # Exact mode computes every pair once; ivf partitions overlap (repeats).
            | "MergeTopk" >> beam.Map(_merge_shard_edges, k, self._mode == "exact")
        )
        return outputs
