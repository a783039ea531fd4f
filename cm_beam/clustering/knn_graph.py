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
* `ivf`: coarse k-means centroids (computed on a sample, a side input) split the pool
  into cells, each point in the cell of its nearest centroid. Each cell first finds its
  points' top-k inside itself; a point's k-th distance there (or max_dist, if smaller)
  then says which other cells can still hold a nearer point: only those whose boundary
  with its own cell (the bisecting hyperplane of the two centroids) is nearer than that
  distance, searched nearest boundary first, at most `num_probes` cells in all
  (`knn_kernels.probe_cells`). With `num_probes` = the number of cells this is exact.
  The recall of this against exact search is estimated on a fixed sample of query
  points (`recall` output).

The per-block math is in `cm_beam.clustering.knn_kernels` (pure numpy).
"""

from __future__ import annotations

from typing import Dict, Optional

import apache_beam as beam
import numpy as np

from cm_beam.clustering import knn_kernels as kk
from cm_beam.array_ops import unique_sorted
from cm_beam.clustering.hac_kernels import hash_part, shard_of
from cm_beam.runtime.stage_timer import StageTimer

MODES = ("exact", "ivf")


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
    with StageTimer("knn"):
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
    with StageTimer("knn"):
        to_j, to_i = kk.pair_candidates(a["prep"], a["ids"], a["bound"], b["prep"], b["ids"], b["bound"],
                                        k, metric, max_dist)
    yield i, _edge_block(*to_j)
    yield j, _edge_block(*to_i)


def _ivf_assign(kv, centroids):
    """Shard block -> (cell, points) per IVF cell: each point belongs to the cell of its
    nearest centroid (and to that one only)."""
    _, block = kv
    with StageTimer("knn"):
        vecs = kk.prepared_vectors(block, np.float32)
        cells = kk.nearest_centroids(vecs, centroids, 1)[:, 0]
        out = []
        for cell in unique_sorted(cells):
            r = np.flatnonzero(cells == cell)
            out.append((int(cell), {"ids": block["ids"][r], "vecs": vecs[r]}))
    return out


def _sample_hits(ids, sample):
    """(rows of `ids` that are recall-sample points, their positions in the sample),
    matched by the shard-independent part of the ids."""
    if sample is None or not len(sample["ids"]) or not len(ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = hash_part(ids)
    pos = np.minimum(np.searchsorted(sample["ids"], low), len(sample["ids"]) - 1)
    rows = np.flatnonzero(sample["ids"][pos] == low)
    return rows, pos[rows]


def _sample_lists(pos, nb, nd):
    nb_low = np.where(nb >= 0, hash_part(nb), kk.PAD_ID)
    return beam.pvalue.TaggedOutput("sample", (pos, nb_low, nd))


def _ivf_cell_topk(kv, centroids, k, metric, max_dist, num_probes, sample):
    """One IVF cell: its points' top-k among the cell's points (edges), then, from each
    point's k-th distance there, the other cells it must search (`kk.probe_cells`):
    (cell, ("query", rows)) to each, and (own cell, ("data", points)) for those searches.

    The bound is the k-th distance within max_dist (a neighbour beyond max_dist is cut
    anyway). Recall-sample points also get their uncut lists, and search the cells the
    uncut k-th distance allows: their lists within max_dist are the same either way (a
    cell past the cut bound holds nothing within it), and their extra searches add no
    edges (`_ivf_probe_topk` drops what lies past a query's bound).
    """
    cell, parts = kv
    with StageTimer("knn"):
        parts = list(parts)
        ids = np.concatenate([p["ids"] for p in parts])
        vecs = np.concatenate([p["vecs"] for p in parts])
        order = np.argsort(ids, kind="stable")
        ids, vecs = ids[order], vecs[order]
        nb, nd = kk.block_topk(vecs, ids, vecs, ids, k, metric, max_dist)
        bound = np.minimum(kk.kth_distance(nd), kk._distance_cut(metric, max_dist))
        sq = kk.sq_norms(vecs).astype(np.float64)
        radius = kk.euclidean_radius(bound, metric, sq)
        hit, pos = _sample_hits(ids, sample)
        if len(hit):
            snb, snd = kk.block_topk(vecs[hit], ids[hit], vecs, ids, k, metric)
            yield _sample_lists(pos, snb, snd)
            radius[hit] = np.maximum(radius[hit], kk.euclidean_radius(kk.kth_distance(snd), metric, sq[hit]))
        own = np.full(len(ids), cell, np.int64)
        probes = kk.probe_cells(vecs, centroids, own, radius, num_probes)
        sample_pos = np.full(len(ids), -1, np.int64)
        sample_pos[hit] = pos
        src, dst, dist = kk.dense_to_edges(ids, nb, nd)
    for item in _split_by_shard(src, dst, dist):
        yield beam.pvalue.TaggedOutput("edges", item)
    # Always: points of other cells may search this one even if none of its own search out.
    yield cell, ("data", {"ids": ids, "vecs": vecs})
    flat = probes.ravel()
    rows = np.repeat(np.arange(len(ids)), probes.shape[1])
    keep = flat >= 0
    flat, rows = flat[keep], rows[keep]
    order = np.argsort(flat, kind="stable")
    flat, rows = flat[order], rows[order]
    for seg in np.split(np.arange(len(flat)), np.flatnonzero(np.diff(flat)) + 1) if len(flat) else []:
        r = rows[seg]
        yield int(flat[seg[0]]), ("query", {"ids": ids[r], "vecs": vecs[r], "bound": bound[r],
                                            "sample_pos": sample_pos[r]})


def _ivf_probe_topk(kv, k, metric, max_dist):
    """One IVF cell and the points of other cells that search it: each query's top-k
    among the cell's points, kept up to the query's bound (its k-th distance in its own
    cell: anything farther cannot enter its list), plus the sample's uncut lists."""
    _, tagged = kv
    data, queries = None, []
    for tag, part in tagged:
        if tag == "data":
            data = part
        else:
            queries.append(part)
    if data is None or not queries:
        return
    with StageTimer("knn"):
        q_ids = np.concatenate([q["ids"] for q in queries])
        q_vecs = np.concatenate([q["vecs"] for q in queries])
        q_bound = np.concatenate([q["bound"] for q in queries])
        sample_pos = np.concatenate([q["sample_pos"] for q in queries])
        nb, nd = kk.block_topk(q_vecs, q_ids, data["vecs"], data["ids"], k, metric, max_dist)
        # The slack: the bound came from another distance matrix (last-bit differences).
        slack = kk.prune_tolerance(metric, 1.0)
        if metric == "sqeuclidean":
            slack = slack + kk._sq_slack(kk.sq_norms(q_vecs), kk.sq_norms(data["vecs"]).max())
        nb = np.where(nd <= (q_bound + slack)[:, None], nb, kk.PAD_ID)
        src, dst, dist = kk.dense_to_edges(q_ids, nb, nd)
        hit = np.flatnonzero(sample_pos >= 0)
        if len(hit):
            snb, snd = kk.block_topk(q_vecs[hit], q_ids[hit], data["vecs"], data["ids"], k, metric)
            yield _sample_lists(sample_pos[hit], snb, snd)
    for item in _split_by_shard(src, dst, dist):
        yield item


def _merge_shard_edges(kv, k, distinct):
    shard, parts = kv
    with StageTimer("knn"):
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
    with StageTimer("knn_recall"):
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
            cells = (
                points
                | "AssignCells" >> beam.FlatMap(_ivf_assign, self._centroids)
                | "GroupCells" >> beam.GroupByKey()
                | "CellTopk" >> beam.FlatMap(_ivf_cell_topk, self._centroids, k, metric, max_dist,
                                             self._num_probes, self._sample)
                .with_outputs("edges", "sample", main="probes")
            )
            probed = (
                cells.probes
                | "GroupProbes" >> beam.GroupByKey()
                | "ProbeTopk" >> beam.FlatMap(_ivf_probe_topk, k, metric, max_dist).with_outputs("sample", main="edges")
            )
            partial = (cells.edges, probed.edges) | "FlattenPartial" >> beam.Flatten()
            if self._sample is not None:
                approx = ((cells.sample, probed.sample) | "FlattenSample" >> beam.Flatten()
                          | "MergeSampleApprox" >> beam.CombineGlobally(_MergeSampleTopk(k)))
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
            # Every (src, dst) pair is computed once: exact mode by shard pairs, ivf because
            # each point belongs to one cell and a query searches a cell at most once.
            | "MergeTopk" >> beam.Map(_merge_shard_edges, k, True)
        )
        return outputs
