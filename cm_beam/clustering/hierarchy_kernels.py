"""Pure-numpy kernels of the merge hierarchy: cut selection and relabelling (no Beam).

cm-cluster records every merge it makes in `merges-*.parquet`, one row per merge:

* `cluster_a`, `cluster_b` (int64, `cluster_a < cluster_b`): the public cluster ids of the
  two merged nodes, i.e. the smallest leaf id among each node's members (the id the node
  has whenever it is a flat cluster);
* `merged` (int64): the public id of the new node, `min(cluster_a, cluster_b) = cluster_a`;
* `height` (float64): the exact average-linkage distance at which they merged (same units
  as eps);
* `size` (int64): members of the new node;
* `round` (int32): the RNN round of the merge (Beam rounds first, then the in-memory
  finish's); negative rounds hold the height-0 merges of exact duplicates, folded before
  the clustering (`duplicates_kernels.fold_merges`); a node's children always merged in
  earlier rounds.

A leaf is an example; its leaf id is its singleton cluster id (the 63-bit hash of its
example_id, `hac_kernels.public_labels`), written as `leaf_id` in `clusters-*.parquet`.
A node is named by (public id, size): the nodes sharing an id form one chain (a leaf,
then each merge it wins) whose sizes strictly increase. Read as loser -> winner
(`cluster_b -> cluster_a`), every id loses at most once, so the applied merges of any
cut form a forest over ids whose roots are the cut's cluster ids: relabelling a leaf is
`hac_kernels.resolve_parents` (pointer jumping), and a cut at the clustering's own eps
gives back its clusters exactly.

Cut semantics are scipy's `fcluster(Z, t, "distance")`: a node is inside one flat cluster
iff the largest merge height in its subtree is <= t. On a monotone dendrogram that
largest height is the node's own. Exact average linkage is monotone (reducible), but RNN
rounds over a sparse kNN candidate graph can, rarely, merge a node below one of its
children (a pair's linkage can drop after a merge brought in a non-candidate pair);
`monotone_heights` lifts each merge to its subtree maximum, and cuts compare that.

Memory: the cut selection holds the merges on one worker, about 60 bytes per merge
(ids, heights, rounds and sort buffers); the relabelling table it produces holds 24
bytes per id that takes part in an applied merge (at most n).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from cm_beam.clustering import hac_kernels as hk
from cm_beam.errors import InputError

RULES = ("distance", "target", "num_clusters")
RULE_FLAGS = {"distance": "--distance_threshold", "target": "--target_mean_cluster_size",
              "num_clusters": "--num_clusters"}


@dataclasses.dataclass
class Merges:
    """The merge table as arrays (see the module docstring)."""

    a: np.ndarray  # int64
    b: np.ndarray  # int64
    height: np.ndarray  # float64
    size: np.ndarray  # int64
    round: np.ndarray  # int32

    def __len__(self) -> int:
        return int(self.a.shape[0])

    @staticmethod
    def empty() -> "Merges":
        return Merges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64),
                      np.zeros(0, np.int32))

    @staticmethod
    def from_pairs(label_1, label_2, height, size, round_index) -> "Merges":
        """Canonical rows (smaller id first) from merges given in any orientation."""
        l1, l2 = np.asarray(label_1, np.int64), np.asarray(label_2, np.int64)
        return Merges(np.minimum(l1, l2), np.maximum(l1, l2), np.asarray(height, np.float64),
                      np.asarray(size, np.int64), np.broadcast_to(np.asarray(round_index, np.int32), l1.shape).copy())

    @staticmethod
    def concat(parts) -> "Merges":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Merges.empty()
        return Merges(*(np.concatenate([getattr(p, f) for p in parts])
                        for f in ("a", "b", "height", "size", "round")))


def monotone_heights(m: Merges) -> np.ndarray:
    """Per merge, the largest height in its subtree (scipy's `max_dists`).

    Children merged in earlier rounds, so one vectorised pass per round suffices: within
    a round every id takes part in at most one merge.
    """
    if len(m) == 0:
        return np.zeros(0)
    ids = np.unique(np.concatenate([m.a, m.b]))
    ia, ib = np.searchsorted(ids, m.a), np.searchsorted(ids, m.b)
    current = np.full(len(ids), -np.inf)  # the subtree maximum of the node each id names now
    out = np.empty(len(m))
    order = np.argsort(m.round, kind="stable")
    rounds = m.round[order]
    bounds = np.flatnonzero(np.r_[True, rounds[1:] != rounds[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = order[lo:hi]
        md = np.maximum(m.height[sel], np.maximum(current[ia[sel]], current[ib[sel]]))
        out[sel] = md
        current[ia[sel]] = md  # the merged node keeps the smaller id (cluster_a)
    return out


def achievable_cuts(md_sorted: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(eps, merges applied) of every distinct cut: eps = 0 and each distinct height.

    A cut at eps applies the merges whose monotone height is <= eps; equal heights
    apply together, so only these counts are achievable.
    """
    md_sorted = np.asarray(md_sorted, np.float64)
    distinct = np.unique(md_sorted[md_sorted > 0])
    eps = np.r_[0.0, distinct]
    return eps, np.searchsorted(md_sorted, eps, side="right")


def choose_cut(md_sorted: np.ndarray, n: int, rule: str, value: float, max_eps: float,
               max_flag: str = "--max_distance") -> Tuple[float, int]:
    """The cut of a hierarchy over n leaves (merges' monotone heights, sorted) for a rule.

    distance: eps = value (must be <= max_eps). target: the achievable cut whose mean
    cluster size n / clusters is nearest to value; num_clusters: whose cluster count is
    nearest to value. Ties go to the finer cut (smaller eps). A target coarser than
    the coarsest cut below max_eps is not reachable: InputError naming the rule's flag
    and `max_flag`. Returns (eps, merges applied).
    """
    flag = RULE_FLAGS.get(rule)
    if flag is None:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    md_sorted = np.asarray(md_sorted, np.float64)
    if len(md_sorted) > 1 and (md_sorted[1:] < md_sorted[:-1]).any():
        raise ValueError("merge heights must be sorted")
    if rule == "distance":
        if not value > 0 or not np.isfinite(value):
            raise InputError(f"{flag} must be a finite number > 0, got {value!r}")
        if value > max_eps:
            raise InputError(f"{flag} {value} is above the hierarchy's largest distance {max_eps} "
                             f"({max_flag}); the hierarchy has no merges above it")
        return float(value), int(np.searchsorted(md_sorted, value, side="right"))
    if n <= 0:
        raise InputError(f"{flag}: the pool has no points to cut")
    eps, applied = achievable_cuts(md_sorted)
    clusters = n - applied
    if rule == "target":
        if not value >= 1 or not np.isfinite(value):
            raise InputError(f"{flag} must be a finite number >= 1, got {value!r}")
        got = n / clusters
        coarsest = got[-1]
        if value > coarsest and not np.isclose(value, coarsest):
            raise InputError(f"{flag} {value}: the coarsest cut below {max_flag} {max_eps} has mean cluster "
                             f"size {coarsest:.4g} ({clusters[-1]} clusters of {n} points); raise {max_flag}")
    else:
        if not value >= 1 or value != int(value):
            raise InputError(f"{flag} must be an integer >= 1, got {value!r}")
        got = clusters.astype(np.float64)
        if value < clusters[-1]:
            raise InputError(f"{flag} {int(value)}: the coarsest cut below {max_flag} {max_eps} has "
                             f"{clusters[-1]} clusters of {n} points; raise {max_flag}")
    best = int(np.argmin(np.abs(got - value)))  # first minimum: the finest of tied cuts
    return float(eps[best]), int(applied[best])


@dataclasses.dataclass
class CutTable:
    """Relabelling of one cut: each id in an applied merge -> (cluster id, cluster size).

    Leaves whose id is not in `ids` are singletons of the cut.
    """

    ids: np.ndarray  # int64, sorted
    roots: np.ndarray  # int64
    sizes: np.ndarray  # int64
    root_sizes: np.ndarray  # int64: one per cluster of size > 1 (for histograms)


def cut_table(m: Merges, md: np.ndarray, eps: float) -> CutTable:
    """The forest of the merges with monotone height <= eps, resolved to its roots."""
    applied = md <= eps
    winners, losers = m.a[applied], m.b[applied]
    ids = np.unique(np.concatenate([winners, losers]))
    roots = hk.resolve_parents(ids, losers, winners)
    # A root's cluster is the last (largest) node of its chain among the applied merges.
    root_pos = np.searchsorted(ids, winners)
    size_of = np.zeros(len(ids), np.int64)
    np.maximum.at(size_of, root_pos, m.size[applied])
    sizes = size_of[np.searchsorted(ids, roots)]
    is_root = roots == ids
    return CutTable(ids, roots, sizes, size_of[is_root])


def relabel(leaf_ids: np.ndarray, table: CutTable) -> Tuple[np.ndarray, np.ndarray]:
    """(cluster_id, cluster_size) of leaves under a cut."""
    leaf_ids = np.asarray(leaf_ids, np.int64)
    pos = hk.lookup(table.ids, leaf_ids)
    hit = pos >= 0
    p = np.maximum(pos, 0)
    labels = np.where(hit, table.roots[p] if len(table.ids) else leaf_ids, leaf_ids)
    sizes = np.where(hit, table.sizes[p] if len(table.ids) else 1, 1)
    return labels.astype(np.int64), sizes.astype(np.int64)


def cut_summary(n: int, table: CutTable, rule: str, value: Optional[float], eps: float,
                applied: int) -> Dict:
    """Counts of a cut: clusters, mean size, histogram (singletons counted from n)."""
    clustered = int(table.root_sizes.sum())
    singletons = n - clustered
    clusters = n - applied
    if clusters != singletons + len(table.root_sizes):
        raise AssertionError(f"cut: {n} leaves, {applied} merges applied, but {singletons} singletons and "
                             f"{len(table.root_sizes)} larger clusters")
    hist = hk.size_histogram(table.root_sizes)
    if singletons:
        hist = {"1": singletons, **hist}
    return {
        "rule": rule,
        "requested": value,
        "distance_threshold": float(eps),
        "merges_applied": int(applied),
        "num_clusters": int(clusters),
        "mean_cluster_size": float(n / clusters) if clusters else 0.0,
        "singletons": int(singletons),
        "largest_cluster": int(table.root_sizes.max()) if len(table.root_sizes) else (1 if n else 0),
        "size_histogram": hist,
    }

