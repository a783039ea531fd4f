"""The math of Cluster-Margin selection as pure numpy functions (no Beam).

Cluster-Margin (Citovsky et al. 2021; docs/design.md, "The margin pool" and
"Cluster-Margin round robin") picks a batch in two cuts, and both are computed
here from *small aggregates* so that the Beam stages never gather the candidates
on one worker:

1. The margin-pool cut: M = the k_m most uncertain eligible examples. Each example
   gets a uint64 `order_key` (float32 priority bits, order-preserving, in the high
   32 bits; the upper 32 bits of a seeded hash of its example_id in the low 32), and
   the k_m-th smallest key is found by radix selection: four passes of 16-bit
   histograms (`radix_histogram`, `radix_step`), each a 65,536-bin count summed
   across workers. Rows whose key equals the threshold (same priority *and* same
   32-bit hash, which is rare) are ordered by example_id.

2. The round-robin cut. Clusters restricted to M are ordered by (size within M,
   cluster order key). Pass r visits, in that order, the clusters with size > r and
   takes each one's member number r (members are ordered by a second seeded hash,
   i.e. a uniformly random permutation that depends only on the seed and the ids).
   If cluster c of size s has global position g_c in that order, its pick in pass r
   has selection rank

       rank(c, r) = P(r) + g_c - C_le(r),
       P(r)    = sum over clusters of min(size, r)   (picks made in passes < r)
       C_le(r) = number of clusters with size <= r  (clusters skipped in pass r),

   and it is selected iff rank < k_t. P and C_le come from the histogram of cluster
   sizes; g_c = C_lt(s) + (clusters of size s in earlier key-range buckets) + (rank
   of c among the clusters of size s in its own bucket), all from per-(bucket, size)
   counts. `SizeHistogram`, `local_round_robin_layout` and `BucketOffsets` compute
   these pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

RADIX_BITS = 16
RADIX_BINS = 1 << RADIX_BITS
RADIX_LEVELS = 64 // RADIX_BITS
_SIGN32 = np.uint32(0x80000000)
_SIGN64 = np.uint64(1 << 63)


# ---------------------------------------------------------------------------
# Order keys
# ---------------------------------------------------------------------------
def float32_order_bits(values) -> np.ndarray:
    """uint32 whose unsigned order equals the float32 order of `values` (no NaN)."""
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = v.view(np.uint32)
    negative = (bits & _SIGN32) != 0
    return np.where(negative, ~bits, bits | _SIGN32).astype(np.uint32)


def order_key(priority, tie_hash) -> np.ndarray:
    """uint64 sort key: priority (smaller = more uncertain) then the hash's upper 32 bits."""
    high = float32_order_bits(priority).astype(np.uint64) << np.uint64(32)
    low = np.asarray(tie_hash, dtype=np.uint64) >> np.uint64(32)
    return high | low


def int64_order_key(values) -> np.ndarray:
    """uint64 whose unsigned order equals the signed order of int64 `values`."""
    return np.asarray(values, dtype=np.int64).view(np.uint64) ^ _SIGN64


# ---------------------------------------------------------------------------
# Radix selection of the k-th smallest key
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RadixState:
    """Progress of a radix selection after `level` digits are fixed.

    `prefix` holds the fixed high digits of the k-th smallest key; `k` is the rank
    (1-based) still wanted among the keys that share the prefix; `below` counts keys
    known to be smaller; `exhausted` means fewer than k keys exist at all.
    """

    level: int = 0
    prefix: int = 0
    k: int = 0
    below: int = 0
    exhausted: bool = False

    @property
    def done(self) -> bool:
        return self.exhausted or self.level == RADIX_LEVELS


def radix_histogram(keys: np.ndarray, state: RadixState) -> np.ndarray:
    """Counts of the next 16-bit digit among keys that share the state's prefix."""
    keys = np.asarray(keys, dtype=np.uint64)
    if state.done or keys.size == 0:
        return np.zeros(RADIX_BINS, dtype=np.int64)
    fixed_bits = RADIX_BITS * state.level
    if fixed_bits:
        keys = keys[(keys >> np.uint64(64 - fixed_bits)) == np.uint64(state.prefix)]
    digits = (keys >> np.uint64(64 - fixed_bits - RADIX_BITS)) & np.uint64(RADIX_BINS - 1)
    return np.bincount(digits.astype(np.int64), minlength=RADIX_BINS).astype(np.int64)


def radix_step(hist: np.ndarray, state: RadixState) -> RadixState:
    """Fixes the next digit given the summed histogram of `radix_histogram`."""
    if state.done:
        return state
    cumulative = np.cumsum(hist)
    total = int(cumulative[-1]) if cumulative.size else 0
    if state.level == 0 and total < state.k:
        return dataclasses.replace(state, exhausted=True)
    digit = int(np.searchsorted(cumulative, state.k, side="left"))
    before = int(cumulative[digit - 1]) if digit > 0 else 0
    return RadixState(
        level=state.level + 1,
        prefix=(state.prefix << RADIX_BITS) | digit,
        k=state.k - before,
        below=state.below + before,
    )


def radix_state(k: int, histograms: Sequence[np.ndarray]) -> RadixState:
    """The state after folding the summed histograms of the levels done so far."""
    state = RadixState(k=k)
    for hist in histograms:
        state = radix_step(np.zeros(RADIX_BINS, dtype=np.int64) if hist is None else hist, state)
    return state


def priority_digit(priority) -> np.ndarray:
    """The first radix digit of an order key (its top 16 bits), from the priority alone."""
    return (float32_order_bits(priority) >> np.uint32(32 - RADIX_BITS)).astype(np.int64)


def prune_digit(first_digit_hist, k: int):
    """The largest first digit that one of the k smallest keys can have; None keeps all.

    `first_digit_hist` counts the first digits of the scored rows before exclusions.
    The returned digit d is the smallest with at least k rows at or below it. With
    k = k_m + (number of exclusion rows), at least k_m of those rows are eligible, so
    every key of the margin pool has a first digit <= d: rows above d can be dropped
    before the join (the cut of docs/design.md, "The margin pool", is unchanged, only
    cheaper).
    """
    if first_digit_hist is None:
        return None
    state = radix_step(np.asarray(first_digit_hist, dtype=np.int64), RadixState(k=k))
    return None if state.exhausted else state.prefix


# ---------------------------------------------------------------------------
# Cluster-size histogram: P(r), C_le(r), C_lt(s)
# ---------------------------------------------------------------------------
class SizeHistogram:
    """The histogram of cluster sizes within M, with the round-robin pass counts.

    Built from (size, number of clusters of that size) pairs.
    """

    def __init__(self, sizes: Iterable[int], counts: Iterable[int]):
        sizes = np.asarray(list(sizes) if not isinstance(sizes, np.ndarray) else sizes, dtype=np.int64)
        counts = np.asarray(list(counts) if not isinstance(counts, np.ndarray) else counts, dtype=np.int64)
        if sizes.size:
            uniq, inverse = np.unique(sizes, return_inverse=True)
            counts = np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)
            keep = counts > 0
            sizes, counts = uniq[keep], counts[keep]
        self.sizes = sizes
        self.counts = counts
        self._cum_clusters = np.concatenate([[0], np.cumsum(counts)])
        self._cum_members = np.concatenate([[0], np.cumsum(counts * sizes)])

    @property
    def num_clusters(self) -> int:
        return int(self._cum_clusters[-1])

    @property
    def num_members(self) -> int:
        return int(self._cum_members[-1])

    def clusters_with_size_at_most(self, r) -> np.ndarray:
        idx = np.searchsorted(self.sizes, np.asarray(r, dtype=np.int64), side="right")
        return self._cum_clusters[idx]

    def clusters_with_size_below(self, s) -> np.ndarray:
        idx = np.searchsorted(self.sizes, np.asarray(s, dtype=np.int64), side="left")
        return self._cum_clusters[idx]

    def picks_before_pass(self, r) -> np.ndarray:
        """P(r) = sum over clusters of min(size, r)."""
        r = np.asarray(r, dtype=np.int64)
        idx = np.searchsorted(self.sizes, r, side="right")  # clusters with size <= r
        return self._cum_members[idx] + r * (self.num_clusters - self._cum_clusters[idx])

    def passes_needed(self, k_t: int) -> int:
        """Number of round-robin passes (0-based last pass + 1) that pick min(k_t, |M|)."""
        target = min(int(k_t), self.num_members)
        if target == 0:
            return 0
        lo, hi = 0, int(self.sizes[-1])  # P(hi) == |M| >= target
        while lo < hi:  # smallest R with P(R) >= target
            mid = (lo + hi) // 2
            if self.picks_before_pass(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def as_dict(self) -> Dict[str, list]:
        """JSON-ready: ascending sizes and the number of clusters of each size."""
        return {"size": [int(s) for s in self.sizes], "clusters": [int(c) for c in self.counts]}


def selection_rank(j, size_global_position, hist: SizeHistogram) -> np.ndarray:
    """rank(c, j) = P(j) + g_c - C_le(j) for member number j of a cluster at position g_c."""
    j = np.asarray(j, dtype=np.int64)
    return hist.picks_before_pass(j) + np.asarray(size_global_position, dtype=np.int64) - hist.clusters_with_size_at_most(j)


# ---------------------------------------------------------------------------
# Per-bucket layout of the round robin
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class BucketLayout:
    """Rows of one key-range bucket, sorted into round-robin order within the bucket.

    order: permutation of the input rows (sorted by group key, then member order).
    member_index: j, the row's position within its group (its round-robin pass).
    group_size: the size of the row's group.
    rank_in_size: the rank of the row's group among this bucket's groups of the same
        size, by group order key.
    size_counts: (sizes, counts) of this bucket's groups, for the global offsets.
    """

    order: np.ndarray
    member_index: np.ndarray
    group_size: np.ndarray
    rank_in_size: np.ndarray
    size_counts: Tuple[np.ndarray, np.ndarray]


def local_round_robin_layout(group_key: np.ndarray, member_key: np.ndarray, id_rank: np.ndarray, singletons: bool) -> BucketLayout:
    """Lays out one bucket.

    group_key: uint64 cluster order key (all rows of a cluster share it).
    member_key: uint64 pick order within a cluster (a seeded hash).
    id_rank: rank of each row's example_id among the bucket's ids (final tie-break).
    singletons: every row is its own group (plain Margin / Random), ordered by
        (group_key, example_id); group_key need not be unique then.
    """
    group_key = np.asarray(group_key, dtype=np.uint64)
    n = group_key.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return BucketLayout(empty, empty, empty, empty, (empty, empty))
    if singletons:
        order = np.lexsort((id_rank, group_key))
        ones = np.ones(n, dtype=np.int64)
        return BucketLayout(order, np.zeros(n, dtype=np.int64), ones, np.arange(n, dtype=np.int64),
                            (np.array([1], dtype=np.int64), np.array([n], dtype=np.int64)))
    order = np.lexsort((id_rank, np.asarray(member_key, dtype=np.uint64), group_key))
    keys = group_key[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    sizes = np.diff(np.concatenate([starts, [n]]))
    group_of_row = np.repeat(np.arange(starts.size), sizes)
    member_index = np.arange(n, dtype=np.int64) - starts[group_of_row]
    # Groups in (size, key) order; keys are already ascending, so a stable sort by size.
    by_size = np.argsort(sizes, kind="stable")
    sorted_sizes = sizes[by_size]
    first_of_size = np.searchsorted(sorted_sizes, sorted_sizes, side="left")
    group_rank_in_size = np.empty(starts.size, dtype=np.int64)
    group_rank_in_size[by_size] = np.arange(starts.size) - first_of_size
    uniq_sizes, size_counts = np.unique(sizes, return_counts=True)
    return BucketLayout(
        order=order,
        member_index=member_index,
        group_size=sizes[group_of_row].astype(np.int64),
        rank_in_size=group_rank_in_size[group_of_row],
        size_counts=(uniq_sizes.astype(np.int64), size_counts.astype(np.int64)),
    )


class BucketOffsets:
    """g_c offsets: C_lt(size) + clusters of the same size in earlier buckets.

    Built from (bucket, size, count) triples of every bucket.
    """

    def __init__(self, buckets, sizes, counts):
        buckets = np.asarray(buckets, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        self.histogram = SizeHistogram(sizes, counts)
        order = np.lexsort((buckets, sizes))
        self._b, self._s, c = buckets[order], sizes[order], counts[order]
        # Exclusive prefix sum of counts within each size, over ascending buckets.
        cum = np.cumsum(c) - c
        first = np.searchsorted(self._s, self._s, side="left")
        self._before = cum - cum[first]

    def offset(self, bucket: int, sizes) -> np.ndarray:
        """C_lt(s) + (clusters of size s in buckets < `bucket`), for each s in `sizes`.

        Every size passed must be one that `bucket` itself reported.
        """
        sizes = np.asarray(sizes, dtype=np.int64)
        out = self.histogram.clusters_with_size_below(sizes).astype(np.int64)
        uniq, inverse = np.unique(sizes, return_inverse=True)
        before = np.empty(uniq.size, dtype=np.int64)
        for i, s in enumerate(uniq.tolist()):
            lo = np.searchsorted(self._s, s, side="left")
            hi = np.searchsorted(self._s, s, side="right")
            pos = lo + int(np.searchsorted(self._b[lo:hi], bucket, side="left"))
            if pos >= hi or self._b[pos] != bucket:
                raise ValueError(f"bucket {bucket} reported no clusters of size {s}")
            before[i] = self._before[pos]
        return out + before[inverse]


def splitters_from_sample(sample_keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """Up to num_buckets - 1 increasing split keys at the sample's quantiles."""
    keys = np.sort(np.asarray(sample_keys, dtype=np.uint64))
    if keys.size == 0 or num_buckets <= 1:
        return np.zeros(0, dtype=np.uint64)
    positions = (np.arange(1, num_buckets) * keys.size) // num_buckets
    return np.unique(keys[positions])


def bucket_of(keys: np.ndarray, splitters: np.ndarray) -> np.ndarray:
    """The key-range bucket of each key: equal keys always share a bucket."""
    if splitters is None:
        splitters = np.zeros(0, dtype=np.uint64)
    return np.searchsorted(splitters, np.asarray(keys, dtype=np.uint64), side="right").astype(np.int64)


def bottom_k(hashes: np.ndarray, values: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k (hash, value) pairs with the smallest hashes: a deterministic uniform sample."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.size <= k:
        return hashes, np.asarray(values)
    idx = np.argpartition(hashes, k - 1)[:k]
    return hashes[idx], np.asarray(values)[idx]


# ---------------------------------------------------------------------------
# Batch diagnostics: is the batch both uncertain and diverse?
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class PickArrays:
    """Per pick: cluster_id, round-robin pass, cluster size within M, order key."""

    cluster: np.ndarray
    round: np.ndarray
    size: np.ndarray
    key: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence["PickArrays"]) -> "PickArrays":
        fields = [f.name for f in dataclasses.fields(cls)]
        dtypes = {"cluster": np.int64, "round": np.int64, "size": np.int64, "key": np.uint64}
        return cls(**{f: (np.concatenate([getattr(p, f) for p in parts]).astype(dtypes[f]) if parts
                          else np.zeros(0, dtypes[f])) for f in fields})


def median_keys(keys: np.ndarray) -> np.ndarray:
    """The key(s) whose uncertainty ranks average to the picks' median rank.

    Rank is increasing in the order key, so the median rank is the rank of the middle
    key (odd count) or the mean of the ranks of the two middle keys (even count).
    """
    keys = np.sort(np.asarray(keys, dtype=np.uint64))
    n = keys.size
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    return keys[[(n - 1) // 2, n // 2]] if n % 2 == 0 else keys[[n // 2]]


def batch_diagnostics(picks: PickArrays, keys_below_median, cluster_margin: bool) -> Dict:
    """What the batch looks like: how uncertain (ranks) and how diverse (clusters).

    picks_per_pass: picks in each round-robin pass (pass r takes member r of each
        cluster still in play).
    singleton_share: share of picks whose cluster has one member within M (None
        unless Cluster-Margin, the only strategy that sizes clusters within M).
    median_uncertainty_rank: median over picks of 1 + the number of eligible
        examples with a smaller order key (priority, then the seeded tie hash); 1 is
        the most uncertain. Every smaller key is in M, so the count is taken over M.
    clusters_touched / clusters_with_multiple_picks: distinct cluster_ids among the
        picks (unclustered examples count as their own cluster), and how many of
        them gave more than one pick.
    """
    n = int(picks.cluster.size)
    rounds = np.bincount(picks.round, minlength=1) if n else np.zeros(0, np.int64)
    if n:
        _, per_cluster = np.unique(picks.cluster, return_counts=True)
    else:
        per_cluster = np.zeros(0, np.int64)
    below = np.asarray(keys_below_median if keys_below_median is not None else [], dtype=np.int64)
    return {
        "picks": n,
        "picks_per_pass": [int(c) for c in rounds],
        "singleton_share": (round(float((picks.size == 1).mean()), 6) if n else None) if cluster_margin else None,
        "median_uncertainty_rank": float(np.mean(below + 1)) if n and below.size else None,
        "clusters_touched": int(per_cluster.size),
        "clusters_with_multiple_picks": int((per_cluster > 1).sum()),
    }
