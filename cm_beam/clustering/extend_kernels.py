"""Pure-numpy kernels of extending a clustering by the examples that joined the pool (no Beam).

An extension (`cm-cluster --extend`, docs/design.md "Growing pools") starts the HAC from
the old clustering's clusters as weighted nodes (count, sum, sum of squared norms; the
state cm-cluster writes to `state-*.parquet`) plus the new examples as singletons, and
runs the same exact-linkage reciprocal-nearest-neighbour rounds (`hac_kernels`) at the
old eps. Candidate edges:

* new -> new: each new point's k nearest new points (the kNN graph of the new points);
* new -> existing: each new point's `cluster_neighbors` existing clusters of smallest
  exact average linkage to it (`cluster_candidates`), within eps.

No edge joins two existing clusters: they are candidates only once a new point merged
into one of them brought its edges to the other, i.e. only when new points bring them
within eps. An existing cluster that gets no edge is untouched and keeps its id.

Node ids: a node's internal id is derived from its public label alone (`node_ids`), the
same for an old cluster (label = its cluster_id) and for a new point (label = its
public leaf id), so the Beam transform and `extend_in_memory` (the sequential
reference the tests compare with) break ties identically, whatever the workers.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from cm_beam.array_ops import unique_sorted
from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.clustering.hac_kernels import Clusters

# Rows x clusters float64 entries per chunk of the point-to-cluster linkage matrix.
_CHUNK_ENTRIES = 1 << 22


def node_shards(labels: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of a node, from its public label (uniform: labels are hashes)."""
    return np.asarray(labels, np.int64) % np.int64(num_shards)


def node_ids(labels: np.ndarray, num_shards: int) -> np.ndarray:
    """Internal ids of nodes named by public labels (label = hash >> 1, so label << 1
    has the hash's top bits: a new point gets the id cm-cluster would give it)."""
    labels = np.asarray(labels, np.int64)
    return hk.make_ids(node_shards(labels, num_shards), labels.astype(np.uint64) << np.uint64(1))


def point_cluster_linkage(x: np.ndarray, x_sq: np.ndarray, nodes: Clusters, metric: str) -> np.ndarray:
    """Exact average linkage of each point (row of x, prepared float64) to each node, [n, m]."""
    dots = (np.asarray(x, np.float64) @ nodes.sums.T) / nodes.counts[None, :]
    if metric == "cosine":
        return 1.0 - dots
    if metric == "sqeuclidean":
        return x_sq[:, None] + (nodes.sq / nodes.counts)[None, :] - 2.0 * dots
    raise ValueError(f"unknown metric {metric!r}")


def cluster_candidates(x: np.ndarray, x_ids: np.ndarray, nodes: Clusters, k: int, metric: str,
                       eps: float, return_linkage: bool = False):
    """(src point id, dst node id): each point's k nodes of smallest linkage within eps.

    Ties go to the smaller node id. The cut keeps a small relative slack (the HAC
    recomputes every candidate's linkage from sums and drops what is above eps).
    With `return_linkage`, a third array holds each pair's linkage.
    """
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64)) + ((np.zeros(0),) if return_linkage else ())
    if len(x_ids) == 0 or len(nodes) == 0 or k <= 0:
        return empty
    x = np.asarray(x, np.float64)
    x_sq = np.einsum("ij,ij->i", x, x)
    nodes = nodes.sorted()
    chunk = max(1, _CHUNK_ENTRIES // max(len(nodes), 1))
    srcs, dsts, links = [], [], []
    for start in range(0, len(x_ids), chunk):
        link = point_cluster_linkage(x[start:start + chunk], x_sq[start:start + chunk], nodes, metric)
        slack = 1e-9 * (1.0 + np.abs(link))
        rows, cols = np.nonzero(link <= eps + slack)
        if len(rows) == 0:
            continue
        value = link[rows, cols]
        order = np.lexsort((cols, value, rows))  # per row: by linkage, then node id (cols are in id order)
        rows, cols, value = rows[order], cols[order], value[order]
        first = np.r_[0, np.flatnonzero(rows[1:] != rows[:-1]) + 1]
        rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
        keep = rank < k
        srcs.append(np.asarray(x_ids, np.int64)[start + rows[keep]])
        dsts.append(nodes.ids[cols[keep]])
        links.append(value[keep])
    if not srcs:
        return empty
    out = (np.concatenate(srcs), np.concatenate(dsts))
    return out + ((np.concatenate(links),) if return_linkage else ())


# Above this many existing clusters the candidate search probes k-means partitions of
# the clusters instead of comparing each new point with every cluster.
PARTITION_MIN_CLUSTERS = 10_000
CLUSTERS_PER_PARTITION = 500
KMEANS_ITERATIONS = 8


def _directions(nodes: Clusters, metric: str) -> np.ndarray:
    """Where a cluster sits, for partitioning: its mean (unit-normalised under cosine)."""
    mean = nodes.sums / nodes.counts[:, None]
    if metric == "cosine":
        mean = kk.normalise_rows(mean)[0]
    return mean.astype(np.float32)


def partition_clusters(nodes: Clusters, metric: str, num_partitions: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """k-means partitions of the existing clusters' means: {"centroids", "part" (per node)}.

    Deterministic for a given `nodes` (sorted by id, as `Clusters.concat` leaves them).
    """
    x = _directions(nodes, metric)
    centroids = kk.kmeans(x, num_partitions, KMEANS_ITERATIONS, seed)
    return {"centroids": centroids, "part": kk.nearest_centroids(x, centroids, 1)[:, 0]}


def cluster_candidates_partitioned(x: np.ndarray, x_ids: np.ndarray, nodes: Clusters, partitions, k: int,
                                   metric: str, eps: float, num_probes: int) -> Tuple[np.ndarray, np.ndarray]:
    """`cluster_candidates` restricted, per point, to the clusters of its `num_probes`
    nearest partitions (approximate: a near cluster in another partition is missed, as
    in the ivf kNN). With every partition probed it equals `cluster_candidates`."""
    if len(x_ids) == 0 or len(nodes) == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x = np.asarray(x, np.float64)
    x_ids = np.asarray(x_ids, np.int64)
    xd = x.astype(np.float32)
    if metric == "cosine":
        xd = kk.normalise_rows(xd)[0].astype(np.float32)
    probes = kk.nearest_centroids(xd, partitions["centroids"], num_probes)
    srcs, dsts, links = [], [], []
    for p in unique_sorted(probes.ravel()):
        rows = np.flatnonzero((probes == p).any(axis=1))
        members = nodes.take(np.flatnonzero(partitions["part"] == p))
        s, d, l = cluster_candidates(x[rows], x_ids[rows], members, k, metric, eps, return_linkage=True)
        srcs.append(s); dsts.append(d); links.append(l)
    if not srcs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    src, dst, link = np.concatenate(srcs), np.concatenate(dsts), np.concatenate(links)
    order = np.lexsort((dst, link, src))  # per point: by linkage, then node id; keep the k first
    src, dst = src[order], dst[order]
    first = np.r_[0, np.flatnonzero(src[1:] != src[:-1]) + 1] if len(src) else np.zeros(0, np.int64)
    rank = np.arange(len(src)) - np.repeat(first, np.diff(np.r_[first, len(src)]))
    keep = rank < k
    return src[keep], dst[keep]


def group_state(owner: np.ndarray, point_keys: np.ndarray, x: np.ndarray, metric: str
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct owner: (owner, count, sum of rows, sum of squared norms), in float64.

    Rows are summed in (owner, point key) order, so the bits do not depend on how the
    rows arrived (workers, block boundaries).
    """
    owner = np.asarray(owner, np.int64)
    d = x.shape[1] if x.ndim == 2 else 0
    if len(owner) == 0:
        return owner, np.zeros(0, np.int64), np.zeros((0, d)), np.zeros(0)
    order = np.lexsort((np.asarray(point_keys), owner))
    owner, x = owner[order], np.asarray(x, np.float64)[order]
    starts = np.r_[0, np.flatnonzero(owner[1:] != owner[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(owner)])
    sums = np.add.reduceat(x, starts, axis=0)
    sq = np.add.reduceat(np.einsum("ij,ij->i", x, x), starts) if metric == "sqeuclidean" else np.zeros(len(starts))
    return owner[starts], counts.astype(np.int64), sums, sq


def extension_counts(final_label: np.ndarray, is_old: np.ndarray, counts: np.ndarray) -> Dict[str, int]:
    """What an extension did, from the HAC's nodes (one row each: final label, old or new,
    weight): new examples that joined an existing cluster, clusters made of new examples
    only, existing clusters merged into another existing one."""
    final_label = np.asarray(final_label, np.int64)
    is_old = np.asarray(is_old, bool)
    labels, inverse = np.unique(final_label, return_inverse=True)
    has_old = np.zeros(len(labels), bool)
    np.logical_or.at(has_old, inverse, is_old)
    new_rows = ~is_old
    return {
        "joined_existing": int(np.asarray(counts)[new_rows & has_old[inverse]].sum()),
        "new_clusters": int((~has_old).sum()),
        "existing_merged": int(is_old.sum() - has_old.sum()),
    }


def extend_in_memory(nodes: Clusters, x: np.ndarray, x_labels: np.ndarray, eps: float, metric: str, k: int,
                     cluster_neighbors: int, num_shards: int):
    """The sequential reference of an extension (what the Beam transform computes).

    nodes: the existing clusters (ids = node_ids(labels)); x: the new points' prepared
    vectors (float64 rows of float32 values); x_labels: their public leaf ids.
    Returns (final Clusters, {node id: final label}, merge log of hac_in_memory).
    """
    x = np.asarray(x, np.float64)
    ids = node_ids(x_labels, num_shards)
    x32 = x.astype(np.float32)
    nb, nd = kk.block_topk(x32, ids, x32, ids, k, metric, eps)
    u1, v1, _ = kk.dense_to_edges(ids, nb, nd)
    u2, v2 = cluster_candidates(x, ids, nodes, cluster_neighbors, metric, eps)
    sq = np.einsum("ij,ij->i", x, x) if metric == "sqeuclidean" else np.zeros(len(ids))
    singles = Clusters(ids, np.ones(len(ids), np.int64), x, sq, np.asarray(x_labels, np.int64))
    d = x.shape[1] if len(x) else nodes.sums.shape[1]
    start = Clusters.concat([nodes, singles], d)
    if len(np.unique(start.ids)) != len(start):
        raise ValueError("node id collision between an existing cluster and a new point")
    final, (losers, winners), _, _, log = hk.hac_in_memory(
        start, np.concatenate([u1, u2]), np.concatenate([v1, v2]), eps, metric, return_merges=True)
    owner = hk.resolve_parents(start.ids, losers, winners)
    label_of = final.labels[hk.lookup(final.ids, owner)]
    return final, dict(zip(start.ids.tolist(), label_of.tolist())), log
