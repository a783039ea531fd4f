"""Pure-numpy kernels that fold exact duplicate vectors into one weighted point (no Beam).

Web-scale pools hold many exact duplicates. Left as separate points, a group of g
identical vectors is a clique of tied zero distances: it fills every member's kNN list
with copies of itself and costs the merge rounds work for nothing. Folded, the group is
one starting cluster with count g and sum g * v (the exact-linkage state of
`hac_kernels.Clusters`: the linkage of g copies of v to any cluster is that of v, so
folding changes no linkage), and its g - 1 merges are written to the hierarchy at
height 0 (`fold_merges`), so every cut is the one of the unfolded pool.

"Identical" means bit-identical prepared vectors (`knn_kernels.prepared_vectors`:
after the metric's normalisation, rounded to float32), exactly what the kNN and the
clustering see. Rows are grouped by a 64-bit hash of their bits and the bits are then
compared, so a hash collision never merges different vectors (`duplicate_groups`).

* `row_hashes`: uint64 hash of each row's float32 bit pattern;
* `duplicate_groups`: each row's representative (the member with the smallest id);
* `fold_merges`: the height-0 merges of the groups, as a balanced binary tree per group;
* `nearest_centroid_per_row`: each row's nearest centroid as a function of the row alone
  (the spatial shard), so identical vectors always share a shard and fold there.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.hashing import splitmix64

# Rows hashed per chunk (chunk x d uint64 temporaries).
_HASH_CHUNK = 1 << 14
# A float32 distance gap below this fraction of |x|^2 + max |c|^2 may be rounding
# (float32 matmul error is ~1e-6 of it): such rows are decided again in float64.
_NEAR_TIE = 1e-4


def row_bits(x: np.ndarray) -> np.ndarray:
    """The uint32 bit patterns of float32 rows (the bytes the duplicates are judged by)."""
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def row_hashes(bits: np.ndarray) -> np.ndarray:
    """A uint64 hash of each row of uint32 words: splitmix64 of the sum of the words
    times per-column odd constants (column-dependent, so permuted rows differ). Only
    a grouping key: `duplicate_groups` compares the rows themselves."""
    bits = np.asarray(bits, np.uint32)
    n, d = bits.shape
    out = np.empty(n, np.uint64)
    mult = splitmix64(np.arange(d, dtype=np.uint64)) | np.uint64(1)
    with np.errstate(over="ignore"):
        for lo in range(0, n, _HASH_CHUNK):
            words = bits[lo:lo + _HASH_CHUNK].astype(np.uint64) * mult[None, :]
            out[lo:lo + _HASH_CHUNK] = splitmix64(words.sum(axis=1, dtype=np.uint64))
    return out


def duplicate_groups(bits: np.ndarray, ids: np.ndarray,
                     hash_rows: Callable[[np.ndarray], np.ndarray] = row_hashes) -> np.ndarray:
    """Each row's representative: the position of the smallest id among the rows with
    the same bits (itself for a row without duplicates).

    `bits` [n, w] are the rows' bit patterns (`row_bits`), `ids` [n] distinct int64.
    Rows are sorted by (hash, id); rows of one hash are then checked word by word, and
    a hash shared by different rows (a collision) is split by the rows themselves, so
    the groups are exactly the sets of equal rows whatever `hash_rows` returns.
    """
    bits = np.asarray(bits)
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.int64)
    h = hash_rows(bits)
    sub = np.zeros(n, np.int64)  # tells apart different rows that share a hash
    order = np.lexsort((ids, h))
    hs = h[order]
    same_hash = hs[1:] == hs[:-1]
    equal = same_hash.copy()
    check = np.flatnonzero(same_hash)  # only rows that share a hash are compared
    for lo in range(0, len(check), _HASH_CHUNK):
        c = check[lo:lo + _HASH_CHUNK]
        equal[c] = (bits[order[c + 1]] == bits[order[c]]).all(axis=1)
    if (same_hash & ~equal).any():
        # A collision: number the distinct rows of each colliding hash.
        for value in np.unique(hs[1:][same_hash & ~equal]):
            rows = np.flatnonzero(h == value)
            _, inverse = np.unique(bits[rows], axis=0, return_inverse=True)
            sub[rows] = inverse.ravel()
        order = np.lexsort((ids, sub, h))
        hs, ss = h[order], sub[order]
        equal = (hs[1:] == hs[:-1]) & (ss[1:] == ss[:-1])
    starts = np.r_[True, ~equal]
    group_first = order[starts][np.cumsum(starts) - 1]  # sorted position -> its group's first row
    rep = np.empty(n, np.int64)
    rep[order] = group_first
    return rep


def fold_counts(rep: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of the representatives, sorted; each one's group size)."""
    reps, counts = np.unique(np.asarray(rep, np.int64), return_counts=True)
    return reps, counts.astype(np.int64)


def fold_merges(labels: np.ndarray, rep: np.ndarray) -> hik.Merges:
    """The height-0 merges that build each duplicate group from its leaves.

    `labels` are the rows' public leaf ids and `rep` their representatives
    (`duplicate_groups`); the representative has the group's smallest label, so the
    group is named by it, as the hierarchy names a node by its smallest leaf. Each
    group of g > 1 rows becomes a balanced binary tree (members in label order; at
    level j the node at position p, a multiple of 2^(j+1), absorbs the node at
    p + 2^j): g - 1 merges in ceil(log2 g) levels, every id in at most one merge per
    level, as `hierarchy_kernels.monotone_heights` requires of a round. Level j of a
    group of L levels is round j - L (negative rounds: before the clustering's rounds,
    which start at 0), so a node's children always come from earlier rounds.
    """
    labels, rep = np.asarray(labels, np.int64), np.asarray(rep, np.int64)
    grouped = np.flatnonzero(np.bincount(rep, minlength=len(rep))[rep] > 1)
    if len(grouped) == 0:
        return hik.Merges.empty()
    order = grouped[np.lexsort((labels[grouped], rep[grouped]))]
    group = rep[order]
    starts = np.r_[True, group[1:] != group[:-1]]
    first = np.flatnonzero(starts)
    sizes = np.diff(np.r_[first, len(order)])
    size_of = np.repeat(sizes, sizes)
    pos = np.arange(len(order)) - np.repeat(first, sizes)  # position inside its group
    levels = np.ceil(np.log2(size_of)).astype(np.int64)
    parts = []
    for j in range(int(levels.max())):
        step = 1 << j
        # Winners at level j: positions p = 0 mod 2^(j+1) whose partner p + 2^j exists.
        win = np.flatnonzero((pos % (2 * step) == 0) & (pos + step < size_of))
        lose = win + step
        size = np.minimum(2 * step, size_of[win] - pos[win])
        parts.append(hik.Merges.from_pairs(labels[order[win]], labels[order[lose]], np.zeros(len(win)), size,
                                           (j - levels[win]).astype(np.int32)))
    return hik.Merges.concat(parts)


def nearest_centroid_per_row(x: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of each row's nearest centroid (squared Euclidean, ties to the smaller
    index) that depends on the row alone, not on the rows beside it.

    A float32 matrix product gives a row different bits in different blocks (BLAS
    kernels block and vectorise by the matrix shape), which can flip the argmin when
    two centroids are nearly tied: identical vectors read in different blocks would
    land in different shards. Rows whose two nearest float32 distances are within
    rounding of each other are decided again one by one in float64; for the others
    the float32 argmin is the exact one.
    """
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    out = np.zeros(len(x), np.int64)
    if len(x) == 0 or len(c) == 1:
        return out
    c_sq = np.einsum("ij,ij->i", c, c)
    c64 = c.astype(np.float64)
    for lo in range(0, len(x), chunk):
        xs = x[lo:lo + chunk]
        d = c_sq[None, :] - 2.0 * (xs @ c.T)  # + |x|^2, the same for every centroid
        two = np.partition(d, 1, axis=1)[:, :2]
        out[lo:lo + chunk] = np.argmin(d, axis=1)
        scale = np.einsum("ij,ij->i", xs, xs) + c_sq.max()
        for i in np.flatnonzero(two[:, 1] - two[:, 0] <= _NEAR_TIE * scale):
            out[lo + i] = int(np.argmin(((c64 - xs[i].astype(np.float64)) ** 2).sum(axis=1)))
    return out
