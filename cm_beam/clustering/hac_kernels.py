"""Pure-numpy kernels of average-linkage HAC from cluster sums (no Beam import).

Average linkage between clusters A and B is the mean of the pairwise distances.
For the two metrics we support it is *exact* from per-cluster sums:

* cosine on unit vectors: mean(1 - a.b) = 1 - s_A . s_B / (|A| |B|);
* squared Euclidean: mean |a - b|^2 = q_A / |A| + q_B / |B| - 2 s_A . s_B / (|A| |B|),

with s the sum of the member vectors and q the sum of their squared norms. So a
cluster is (count, sum vector, sum of squared norms), merging adds them, and the
linkage of any candidate pair is computed exactly, in float64. The kNN graph only
chooses which cluster pairs are candidates.

A round of reciprocal-nearest-neighbour (RNN) merging (average linkage is
reducible, so all RNN pairs can merge at once without changing the dendrogram):

1. `edge_linkage`: exact linkage of every candidate edge; edges above eps are
   dropped for good (the linkage of a merged cluster is a weighted mean of its
   parts', so a pair whose every candidate edge is above eps stays above eps);
2. `nearest_candidates`: each cluster's nearest candidate, ties broken by a hash of
   the pair (`pair_priority`); a cluster with no candidate left retires;
3. `reciprocal_pairs`: pairs that are each other's nearest merge; the merged
   cluster keeps the smaller id;
4. `relabel_edges`: edges renamed to the surviving ids, self-loops and duplicates
   dropped.

`hac_in_memory` runs rounds until nothing merges: it is the bounded finish of the
Beam transform and the sequential reference the tests compare with scipy.

Cluster ids are int64 >= 0; arrays of cluster state are kept sorted by id so that
lookups are `searchsorted`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from cm_beam.array_ops import unique_sorted
from cm_beam.hashing import splitmix64

METRICS = ("cosine", "sqeuclidean")
# Edges per chunk when gathering sum vectors (chunk x d float64 per side).
_GATHER_CHUNK = 1 << 16


@dataclasses.dataclass
class Clusters:
    """Cluster state, sorted by `ids`.

    labels: the output cluster id (smallest member id hash, >= 0), carried with the
    state because the internal ids encode a shard and are not the public id.
    """

    ids: np.ndarray  # int64 [m]
    counts: np.ndarray  # int64 [m]
    sums: np.ndarray  # float64 [m, d]
    sq: np.ndarray  # float64 [m] (sum of squared norms; zeros under cosine)
    labels: np.ndarray  # int64 [m]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @staticmethod
    def empty(d: int) -> "Clusters":
        return Clusters(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, d)), np.zeros(0), np.zeros(0, np.int64))

    @staticmethod
    def concat(parts: List["Clusters"], d: int) -> "Clusters":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Clusters.empty(d)
        c = Clusters(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.counts for p in parts]),
            np.concatenate([p.sums for p in parts]),
            np.concatenate([p.sq for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )
        return c.sorted()

    def sorted(self) -> "Clusters":
        order = np.argsort(self.ids, kind="stable")
        return self.take(order)

    def take(self, idx) -> "Clusters":
        return Clusters(self.ids[idx], self.counts[idx], self.sums[idx], self.sq[idx], self.labels[idx])

    def __reduce__(self):
        # Pickled (i.e. shipped between Beam stages) with every sum row that float32
        # holds exactly stored as float32: all singletons, since points are float32
        # vectors (knn_kernels.prepared_vectors), so most of the state in early rounds.
        # Lossless: other rows stay float64.
        s32 = self.sums.astype(np.float32)
        exact = (s32.astype(np.float64) == self.sums).all(axis=1)
        return (_unpack_clusters, (self.ids, self.counts, exact, s32[exact], self.sums[~exact], self.sq, self.labels))


def _unpack_clusters(ids, counts, exact, sums32, sums64, sq, labels) -> Clusters:
    sums = np.empty((len(ids), sums32.shape[1]), np.float64)
    sums[exact] = sums32
    sums[~exact] = sums64
    return Clusters(ids, counts, sums, sq, labels)


def linkage_from_sums(metric: str, n_a, s_a, q_a, n_b, s_b, q_b) -> np.ndarray:
    """Exact average linkage of cluster pairs (rows), float64."""
    n_a = np.asarray(n_a, np.float64)
    n_b = np.asarray(n_b, np.float64)
    dots = np.einsum("ij,ij->i", np.asarray(s_a, np.float64), np.asarray(s_b, np.float64))
    if metric == "cosine":
        return 1.0 - dots / (n_a * n_b)
    if metric == "sqeuclidean":
        return np.asarray(q_a) / n_a + np.asarray(q_b) / n_b - 2.0 * dots / (n_a * n_b)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def lookup(ids_sorted: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Positions of `keys` in the sorted id array; -1 where absent."""
    pos = np.searchsorted(ids_sorted, keys)
    pos_c = np.minimum(pos, max(len(ids_sorted) - 1, 0))
    found = (len(ids_sorted) > 0) & (ids_sorted[pos_c] == keys) if len(ids_sorted) else np.zeros(len(keys), bool)
    return np.where(found, pos_c, -1)


def edge_linkage(clusters_u: Clusters, iu: np.ndarray, clusters_v: Clusters, iv: np.ndarray, metric: str) -> np.ndarray:
    """Linkage of edges (clusters_u[iu], clusters_v[iv]), gathered in chunks."""
    out = np.empty(len(iu), np.float64)
    for start in range(0, len(iu), _GATHER_CHUNK):
        a = iu[start:start + _GATHER_CHUNK]
        b = iv[start:start + _GATHER_CHUNK]
        out[start:start + _GATHER_CHUNK] = linkage_from_sums(
            metric,
            clusters_u.counts[a], clusters_u.sums[a], clusters_u.sq[a],
            clusters_v.counts[b], clusters_v.sums[b], clusters_v.sq[b],
        )
    return out


# Linkages closer than tie_scale * TIE_RESOLUTION are ties. tie_scale bounds the size of
# the terms a linkage is computed from (1 under cosine: dots of unit vectors; under
# sqeuclidean the largest squared norm, `build_clusters` plans it), so float64 rounding,
# ~1e-16 of it, is far below the resolution. Tied (or duplicate) points give linkages
# that differ only by that rounding, and the rounding is not random (it grows with the
# cluster sizes): ordered by it, a clique of tied points chains into its largest
# cluster, one merge per round.
TIE_RESOLUTION = 2.0 ** -36


def tie_keys(link: np.ndarray, tie_scale: float = 1.0) -> np.ndarray:
    """int64 order keys of linkages: floor(link / (tie_scale * TIE_RESOLUTION)). Equal
    keys are ties (broken by `pair_priority`). Only the choice of nearest candidate uses
    them; merge heights and the eps cut stay exact.
    """
    q = np.floor(np.asarray(link, np.float64) / (float(tie_scale) * TIE_RESOLUTION))
    return np.clip(q, -2.0 ** 62, 2.0 ** 62).astype(np.int64)


def pair_priority(a: np.ndarray, b: np.ndarray, round_index: int = 0) -> np.ndarray:
    """A uint64 hash of each unordered cluster pair {a, b} in a round: the tie-break
    between candidates at equal linkage (`tie_keys`).

    Edges ordered by (tie key, pair_priority) are totally ordered (up to 64-bit hash
    collisions, broken by id), and each cluster's nearest candidate is its first edge
    in that order, so an edge that is first for both of its ends is a reciprocal pair.
    Among tied edges that is a locally minimal edge under a random order: in a clique
    of t tied clusters about a quarter of them merge per round. The round salts the
    hash: with one fixed order, the pairs left after a round are those the order
    disfavoured, and the fraction merging shrinks round after round. Breaking ties by
    the smaller id instead makes every cluster of the clique choose the same one, and
    one pair merges per round (t - 1 rounds for the clique). Both ends, whatever their
    shard, compute the same priority from the ids and the round alone.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    lo, hi = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)
    salt = splitmix64(np.array([round_index], np.uint64))[0]
    return splitmix64(splitmix64(lo ^ salt) ^ hi)


def nearest_candidates(src: np.ndarray, dst: np.ndarray, link: np.ndarray, round_index: int = 0,
                       tie_scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct src: its nearest dst (min `tie_keys` of the linkage, then min
    `pair_priority` in this round, then min id) and that (exact) linkage.

    `src`/`dst` are directed edges (give both directions of an undirected edge).
    Returns (src_unique sorted, nn, nn_linkage).
    """
    if len(src) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    order = np.lexsort((dst, pair_priority(src, dst, round_index), tie_keys(link, tie_scale), src))
    s = src[order]
    first = np.ones(len(s), bool)
    first[1:] = s[1:] != s[:-1]
    sel = order[first]
    return src[sel], dst[sel], link[sel]


def reciprocal_pairs(src_unique: np.ndarray, nn: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(winner, loser) of each reciprocal nearest-neighbour pair; winner = smaller id.

    Only pairs whose both nearest choices are known (both in `src_unique`) count.
    """
    pos = lookup(src_unique, nn)
    ok = pos >= 0
    recip = np.zeros(len(src_unique), bool)
    recip[ok] = nn[pos[ok]] == src_unique[ok]
    keep = recip & (src_unique < nn)
    return src_unique[keep], nn[keep]


def merge_clusters(clusters: Clusters, winners: np.ndarray, losers: np.ndarray) -> Clusters:
    """Adds each loser into its winner and removes the losers (both must be present)."""
    if len(winners) == 0:
        return clusters
    iw = lookup(clusters.ids, winners)
    il = lookup(clusters.ids, losers)
    if (iw < 0).any() or (il < 0).any():
        raise AssertionError("merge of a cluster that is not in the state")
    counts = clusters.counts.copy()
    sums = clusters.sums.copy()
    sq = clusters.sq.copy()
    labels = clusters.labels.copy()
    counts[iw] += counts[il]
    sums[iw] += sums[il]
    sq[iw] += sq[il]
    labels[iw] = np.minimum(labels[iw], labels[il])
    keep = np.ones(len(clusters), bool)
    keep[il] = False
    return Clusters(clusters.ids[keep], counts[keep], sums[keep], sq[keep], labels[keep])


def relabel_edges(u: np.ndarray, v: np.ndarray, old: np.ndarray, new: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Renames edge endpoints (old -> new, `old` sorted), canonicalises u < v, drops
    self-loops and duplicate edges."""
    if len(old):
        pu = lookup(old, u)
        pv = lookup(old, v)
        u = np.where(pu >= 0, new[np.maximum(pu, 0)], u)
        v = np.where(pv >= 0, new[np.maximum(pv, 0)], v)
    return canonical_edges(u, v)


def canonical_edges(u: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Undirected edges as unique (min, max) pairs without self-loops, sorted."""
    a = np.minimum(u, v)
    b = np.maximum(u, v)
    keep = a != b
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return a.astype(np.int64), b.astype(np.int64)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first]


@dataclasses.dataclass
class RoundStats:
    edges: int  # candidate edges at the start of the round (before the eps cut)
    active: int  # clusters with a candidate within eps
    merges: int


class TooManyEdges(ValueError):
    """More distinct candidate edges than the in-memory finish may hold."""

    def __init__(self, edges: int):
        super().__init__(f"{edges} distinct candidate edges")
        self.edges = edges


def dense_canonical_edges(ids_sorted: np.ndarray, u: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Edges between ids as unique (a < b) pairs of positions in `ids_sorted`, sorted.

    The same edges as `canonical_edges`, but positions pack into one int64 key
    (a * m + b), so one sort replaces a two-key lexsort. Raises ValueError if an
    edge names an id that is not in `ids_sorted`.
    """
    iu = lookup(ids_sorted, np.asarray(u, np.int64))
    iv = lookup(ids_sorted, np.asarray(v, np.int64))
    if (iu < 0).any() or (iv < 0).any():
        raise ValueError("an edge names a cluster that is not in the state")
    a, b = np.minimum(iu, iv), np.maximum(iu, iv)
    keep = a != b
    m = np.int64(max(len(ids_sorted), 1))
    key = unique_sorted(a[keep] * m + b[keep])
    return key // m, key % m


def hac_in_memory(clusters: Clusters, u: np.ndarray, v: np.ndarray, eps: float, metric: str,
                  max_rounds: int = 1 << 30, max_edges: Optional[int] = None, return_merges: bool = False,
                  first_round: int = 0, tie_scale: float = 1.0):
    """Runs RNN rounds until no candidate edge within eps is left.

    The same round semantics as the Beam rounds (and `testing.reference_kernels.rnn_round`): exact linkage in
    the canonical orientation (smaller id first), cut at eps, nearest candidate by
    (`tie_keys`, `pair_priority`, id), reciprocal pairs merge into the smaller id;
    `first_round` numbers this call's first round (it salts `pair_priority`, so a finish
    after r Beam rounds continues their sequence); `tie_scale` as in `tie_keys`. Faster for
    many rounds on one worker: clusters are dense indices in id order (so index
    order is id order), only edges touching a cluster merged in the last round get
    their linkage recomputed (the others' clusters did not change: same bits), and
    only those can become duplicates.

    Returns (final clusters, (loser ids, winner ids) of every merge in order, list
    of RoundStats, remaining edges (u, v) as ids). `resolve_parents` maps any
    initial id to its final cluster. Raises TooManyEdges before any round when the
    distinct edges are more than `max_edges`.

    With `return_merges`, a fifth element is the merge log: a dict of arrays, one row
    per merge in order, "label_w", "label_l" (the public labels of winner and loser
    before the merge), "height" (their linkage), "size" (of the merged cluster) and
    "round" (0-based round of this call).
    """
    clusters = clusters.sorted()
    m = len(clusters)
    ids = clusters.ids
    counts, sums, sq = clusters.counts.copy(), clusters.sums.copy(), clusters.sq.copy()
    labels = clusters.labels.copy()
    alive = np.ones(m, bool)
    iu, iv = dense_canonical_edges(ids, u, v)
    if max_edges is not None and len(iu) > max_edges:
        raise TooManyEdges(len(iu))
    link = np.empty(len(iu))
    dirty = np.ones(len(iu), bool)
    state = Clusters(ids, counts, sums, sq, labels)  # views: updated in place below
    all_losers: List[np.ndarray] = []
    all_winners: List[np.ndarray] = []
    stats: List[RoundStats] = []
    log: Dict[str, List[np.ndarray]] = {"label_w": [], "label_l": [], "height": [], "size": [], "round": []}
    rounds = 0
    while len(iu) and rounds < max_rounds:
        rounds += 1
        n_edges = len(iu)
        d = np.flatnonzero(dirty)
        if len(d):
            link[d] = edge_linkage(state, iu[d], state, iv[d], metric)
        keep = link <= eps
        iu, iv, link = iu[keep], iv[keep], link[keep]
        if len(iu) == 0:
            stats.append(RoundStats(n_edges, 0, 0))
            break
        # Nearest candidate: min tie key, then min pair priority, then min index (= min id).
        key = tie_keys(link, tie_scale)
        mink = np.full(m, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(mink, iu, key)
        np.minimum.at(mink, iv, key)
        cu, cv = key == mink[iu], key == mink[iv]
        tied = np.flatnonzero(cu | cv)
        tu, tv, cu, cv = iu[tied], iv[tied], cu[tied], cv[tied]
        prio = pair_priority(ids[tu], ids[tv], first_round + rounds - 1)
        minp = np.full(m, np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(minp, tu[cu], prio[cu])
        np.minimum.at(minp, tv[cv], prio[cv])
        nn = np.full(m, m, np.int64)
        c = cu & (prio == minp[tu])
        np.minimum.at(nn, tu[c], tv[c])
        c = cv & (prio == minp[tv])
        np.minimum.at(nn, tv[c], tu[c])
        # The exact linkage of each cluster's chosen edge (edges are unique pairs).
        minl = np.full(m, np.inf)
        c = nn[tu] == tv
        minl[tu[c]] = link[tied[c]]
        c = nn[tv] == tu
        minl[tv[c]] = link[tied[c]]
        active = np.flatnonzero(minl < np.inf)
        partner = nn[active]
        recip = (nn[partner] == active) & (active < partner)
        w, l = active[recip], partner[recip]
        if return_merges:
            log["label_w"].append(labels[w].copy()); log["label_l"].append(labels[l].copy())
            log["height"].append(minl[w]); log["size"].append(counts[w] + counts[l])
            log["round"].append(np.full(len(w), rounds - 1, np.int32))
        counts[w] += counts[l]
        sums[w] += sums[l]
        sq[w] += sq[l]
        labels[w] = np.minimum(labels[w], labels[l])
        alive[l] = False
        stats.append(RoundStats(n_edges, len(active), len(w)))
        all_winners.append(ids[w])
        all_losers.append(ids[l])
        parent = np.arange(m)
        parent[l] = w
        iu, iv = parent[iu], parent[iv]
        touched = np.zeros(m, bool)
        touched[w] = True
        dirty = touched[iu] | touched[iv]
        a, b = np.minimum(iu, iv), np.maximum(iu, iv)
        keep = a != b
        a, b, link, dirty = a[keep], b[keep], link[keep], dirty[keep]
        # Duplicates can only be among edges touching a winner (all of them dirty).
        di = np.flatnonzero(dirty)
        if len(di):
            key = a[di] * m + b[di]
            _, first = np.unique(key, return_index=True)
            drop = np.ones(len(di), bool)
            drop[first] = False
            if drop.any():
                keep = np.ones(len(a), bool)
                keep[di[drop]] = False
                a, b, link, dirty = a[keep], b[keep], link[keep], dirty[keep]
        iu, iv = a, b
    final = Clusters(ids[alive], counts[alive], sums[alive], sq[alive], labels[alive])
    losers = np.concatenate(all_losers) if all_losers else np.zeros(0, np.int64)
    winners = np.concatenate(all_winners) if all_winners else np.zeros(0, np.int64)
    if return_merges:
        merges = {k: np.concatenate(v) if v else np.zeros(0, np.float64 if k == "height" else np.int64)
                  for k, v in log.items()}
        return final, (losers, winners), stats, (ids[iu], ids[iv]), merges
    return final, (losers, winners), stats, (ids[iu], ids[iv])


def resolve_parents(ids: np.ndarray, losers: np.ndarray, winners: np.ndarray) -> np.ndarray:
    """Final cluster id of each of `ids`, following loser -> winner merges.

    A loser merges once and winners have smaller ids, so chains terminate; pointer
    jumping halves every chain per pass.
    """
    if len(losers) == 0:
        return np.asarray(ids, np.int64).copy()
    order = np.argsort(losers, kind="stable")
    lo, wi = losers[order], winners[order]
    # Pointer jumping on the loser table itself first.
    while True:
        pos = lookup(lo, wi)
        moved = pos >= 0
        if not moved.any():
            break
        wi = np.where(moved, wi[np.maximum(pos, 0)], wi)
    pos = lookup(lo, np.asarray(ids, np.int64))
    return np.where(pos >= 0, wi[np.maximum(pos, 0)], ids)


def size_histogram(sizes: np.ndarray) -> Dict[str, int]:
    """Counts of clusters by size bucket (1, 2, 3-4, 5-8, ... powers of two)."""
    sizes = np.asarray(sizes, np.int64)
    out: Dict[str, int] = {}
    if len(sizes) == 0:
        return out
    lo = 1
    hi = 1
    while lo <= sizes.max():
        count = int(((sizes >= lo) & (sizes <= hi)).sum())
        if count:
            out[f"{lo}" if lo == hi else f"{lo}-{hi}"] = count
        lo, hi = hi + 1, hi * 2 if hi > 1 else 2
    return out


# --- Internal cluster ids ----------------------------------------------------
# An internal id is (shard << SHARD_SHIFT) | (53 bits of the example-id hash): the
# shard that owns a cluster's state is readable from its id (no lookup table), and
# a merged cluster keeps the smaller id, so it lives in the smaller shard. The
# public cluster_id is the separate `labels` field (smallest member hash, >= 0).
SHARD_SHIFT = 53
MAX_SHARDS = 1 << (63 - SHARD_SHIFT)


def make_ids(shards: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    low = (np.asarray(hashes, np.uint64) >> np.uint64(64 - SHARD_SHIFT)).astype(np.int64)
    return (np.asarray(shards, np.int64) << SHARD_SHIFT) | low


def shard_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, np.int64) >> SHARD_SHIFT


def public_labels(hashes: np.ndarray) -> np.ndarray:
    """The public cluster id of a singleton: its 64-bit id hash shifted to int64 >= 0."""
    return (np.asarray(hashes, np.uint64) >> np.uint64(1)).astype(np.int64)


LOW_MASK = (1 << SHARD_SHIFT) - 1


def hash_part(ids: np.ndarray) -> np.ndarray:
    """The shard-independent part of internal ids (for matching points across shardings)."""
    return np.asarray(ids, np.int64) & LOW_MASK
