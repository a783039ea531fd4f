"""Pure-numpy kernels of the sharded k-nearest-neighbour graph (no Beam import).

The kNN graph stage (`cm_beam.clustering.knn_graph`) moves blocks of points between workers;
everything it computes on a block lives here so it can be tested against brute
force on its own:

* `normalise_rows`: L2 normalisation (cosine works on unit vectors);
* `pair_distances`: the distance matrix of two blocks (one matmul), cosine or
  squared Euclidean, in float32 (it only chooses *candidates*: the clustering
  recomputes every linkage exactly in float64);
* `block_topk`: each query row's k nearest columns of a block, computed in row
  chunks so a block pair never materialises more than `chunk` x m distances;
* `kth_distance` / `pair_candidates`: a point's k-th distance inside its own block
  bounds what another block can add; one distance matrix per block pair gives both
  directions' candidates under those bounds;
* `topk_edges`: merges partial neighbour lists of the same points (from different
  block pairs or IVF partitions) into each point's top k, dropping repeats;
* `kmeans` / `nearest_centroids`: a small deterministic k-means for the IVF
  partitions and the spatial shards;
* `euclidean_radius` / `boundary_distances` / `probe_cells`: which other IVF cells a
  point must search: those whose boundary with its own cell is nearer than its k-th
  distance found in its own cell (a cell beyond that cannot hold a closer point).

Top-k lists are (ids int64 [n, k], dists float32 [n, k]) sorted by (distance, id),
padded with id -1 and distance +inf when fewer than k neighbours exist.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from cm_beam.array_ops import unique_sorted

METRICS = ("cosine", "sqeuclidean")
PAD_ID = -1


def normalise_rows(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit L2 norm (float64) and the original norms.

    Rows of norm 0 stay 0 (callers reject them under cosine before this matters).
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    safe = np.where(norms > 0, norms, 1.0)
    return x / safe[:, None], norms


def sq_norms(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return np.einsum("ij,ij->i", x, x, dtype=np.float64 if x.dtype == np.float64 else np.float32)


def pair_distances(a: np.ndarray, b: np.ndarray, metric: str, a_sq: Optional[np.ndarray] = None,
                   b_sq: Optional[np.ndarray] = None) -> np.ndarray:
    """Distances between the rows of `a` [n, d] and `b` [m, d] as float32 [n, m].

    cosine: 1 - a.b (rows must already be unit vectors); sqeuclidean:
    |a|^2 + |b|^2 - 2 a.b, clipped at 0 (cancellation can make it slightly negative).
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    dots = a @ b.T
    if metric == "cosine":
        out = 1.0 - dots
    elif metric == "sqeuclidean":
        a_sq = sq_norms(a) if a_sq is None else a_sq.astype(np.float32)
        b_sq = sq_norms(b) if b_sq is None else b_sq.astype(np.float32)
        out = a_sq[:, None] + b_sq[None, :] - 2.0 * dots
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    np.maximum(out, 0.0, out=out)
    return out


def block_topk(q: np.ndarray, q_ids: np.ndarray, x: np.ndarray, x_ids: np.ndarray, k: int, metric: str,
               max_dist: float = np.inf, chunk: int = 2048) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of `q`, its k nearest rows of `x` (never itself, matched by id).

    Neighbours farther than `max_dist` (plus a float32 slack, `prune_tolerance`) are
    dropped (padded), which equals taking the top-k and then cutting there.
    """
    n = q.shape[0]
    out_ids = np.full((n, k), PAD_ID, np.int64)
    out_d = np.full((n, k), np.inf, np.float32)
    if n == 0 or x.shape[0] == 0:
        return out_ids, out_d
    x_ids = np.asarray(x_ids, np.int64)
    if x_ids.size > 1 and (x_ids[1:] < x_ids[:-1]).any():
        # Columns in id order: a column index then breaks distance ties as the id does.
        order = np.argsort(x_ids, kind="stable")
        x, x_ids = np.asarray(x)[order], x_ids[order]
    x_sq = sq_norms(x.astype(np.float32)) if metric == "sqeuclidean" else None
    q_ids = np.asarray(q_ids, np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d = pair_distances(q[start:stop], x, metric, b_sq=x_sq)
        # Never itself: each query id's column, found by search (x_ids are sorted).
        pos = np.minimum(np.searchsorted(x_ids, q_ids[start:stop]), len(x_ids) - 1)
        self_rows = np.flatnonzero(x_ids[pos] == q_ids[start:stop])
        d[self_rows, pos[self_rows]] = np.inf
        if not np.isfinite(max_dist):
            out_ids[start:stop], out_d[start:stop] = _topk_columns(d, x_ids, k)
            continue
        cut = _distance_cut(metric, max_dist)
        if metric == "sqeuclidean":
            cut = cut + _sq_slack(sq_norms(q[start:stop].astype(np.float32))[:, None], x_sq[None, :])
        within = d <= cut
        counts = within.sum(axis=1)
        full = np.flatnonzero(counts > k)
        if len(full):
            # Rows with more than k neighbours inside the cut: a selection over the row.
            sub = np.where(within[full], d[full], np.float32(np.inf))
            out_ids[start + full], out_d[start + full] = _topk_columns(sub, x_ids, k)
            within[full] = False
            counts[full] = 0
        # The other rows (the usual case for a clustering threshold): no selection,
        # just sort their few survivors. (flatnonzero: 2-D np.nonzero is ~20x slower.)
        rows, cols = np.divmod(np.flatnonzero(within), within.shape[1])
        dd = d[rows, cols]
        cid = x_ids[cols]
        order = np.lexsort((cid, dd, rows))
        rows, cid, dd = rows[order], cid[order], dd[order]
        rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        out_ids[start + rows, rank] = cid
        out_d[start + rows, rank] = dd
    return out_ids, out_d


def _distance_cut(metric: str, max_dist: float) -> float:
    """The float32 cut for `max_dist` (inf stays inf): slack so that no pair truly
    within max_dist is lost; callers recompute exact float64 linkages and cut exactly.
    Squared Euclidean adds `_sq_slack` of the pair's norms on top."""
    return max_dist + prune_tolerance(metric, max_dist) if np.isfinite(max_dist) else np.inf


def _sq_slack(a_sq, b_sq):
    """Extra cut for squared Euclidean pairs: float32 error grows with the squared norms."""
    return 1e-5 * (a_sq + b_sq)


def kth_distance(dists: np.ndarray) -> np.ndarray:
    """Each row's k-th (last) distance of a padded top-k table: +inf when the row has
    fewer than k neighbours. A point's final k-th distance can only be smaller, so
    this bounds which other points can still enter its list (`pair_candidates`)."""
    return np.asarray(dists[:, -1], np.float64) if dists.shape[1] else np.full(len(dists), np.inf)


def pair_candidates(a: np.ndarray, a_ids: np.ndarray, a_bound: np.ndarray, b: np.ndarray, b_ids: np.ndarray,
                    b_bound: np.ndarray, k: int, metric: str, max_dist: float = np.inf,
                    max_entries: int = 1 << 23):
    """Candidate edges between two disjoint blocks, both directions from one distance matrix.

    For each row r of `a`: its neighbours c in `b` with d(r, c) <= a_bound[r] and
    within `max_dist` (with the same float32 slack as `block_topk`), at most its k
    nearest by (distance, id); the same for each row of `b` among the rows of `a`.
    With bounds from each point's own block (`kth_distance` of its `block_topk`
    list), every neighbour of the final top-k that lies in the other block survives,
    while the distance matrix, the largest cost, is computed once for the pair.

    Returns ((src, dst, dist) of a's rows, (src, dst, dist) of b's rows); several
    chunks of `a` may each list up to k edges of a row of `b` (merge with `topk_edges`).
    """
    a_ids, b_ids = np.asarray(a_ids, np.int64), np.asarray(b_ids, np.int64)
    a_bound = np.asarray(a_bound, np.float64)
    b_bound = np.asarray(b_bound, np.float64)
    na, nb = a.shape[0], b.shape[0]
    fwd, back = [], []
    if na and nb:
        cut = _distance_cut(metric, max_dist)
        a_sq = sq_norms(np.asarray(a, np.float32)) if metric == "sqeuclidean" else None
        b_sq = sq_norms(np.asarray(b, np.float32)) if metric == "sqeuclidean" else None
        # Largest per-pair cut of a row / column (sqeuclidean's slack grows with the norms):
        # a coarse limit for the full-matrix pass, refined exactly on the few survivors.
        slack_a = _sq_slack(a_sq, b_sq.max()) if metric == "sqeuclidean" and np.isfinite(cut) else 0.0
        slack_b = _sq_slack(b_sq, a_sq.max()) if metric == "sqeuclidean" and np.isfinite(cut) else 0.0
        # Rounded up to float32 so the coarse pass never drops a pair the exact test keeps.
        up = np.float32(np.inf)
        lim_a = np.nextafter(np.minimum(a_bound, cut + slack_a).astype(np.float32), up)
        lim_b = np.nextafter(np.minimum(b_bound, cut + slack_b).astype(np.float32), up)
        if metric == "cosine":
            # d = 1 - dot <= lim  <=>  dot >= 1 - lim: test the dot products themselves
            # (no distance matrix), with a few float32 ulps of slack toward keeping.
            dot_a = (1.0 - lim_a.astype(np.float64) - 1e-6).astype(np.float32)
            dot_b = (1.0 - lim_b.astype(np.float64) - 1e-6).astype(np.float32)
            a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        chunk = max(1, max_entries // nb)
        for start in range(0, na, chunk):
            stop = min(na, start + chunk)
            if metric == "cosine":
                dots = a32[start:stop] @ b32.T
                # flatnonzero: 2-D np.nonzero is ~20x slower on a sparse mask.
                flat = np.flatnonzero((dots >= dot_a[start:stop, None]) | (dots >= dot_b[None, :]))
                # The same float32 operations as pair_distances: bit-identical distances.
                dd = np.maximum(np.float32(1.0) - dots.ravel()[flat], np.float32(0.0))
            else:
                d = pair_distances(a[start:stop], b, metric, a_sq=a_sq[start:stop], b_sq=b_sq)
                flat = np.flatnonzero(d <= np.maximum(lim_a[start:stop, None], lim_b[None, :]))
                dd = d.ravel()[flat]
            rows, cols = np.divmod(flat, nb)
            rows = rows + start
            pair_cut = cut
            if metric == "sqeuclidean" and np.isfinite(cut):
                pair_cut = cut + _sq_slack(a_sq[rows], b_sq[cols])
            within = dd <= pair_cut
            to_b = within & (dd <= a_bound[rows])
            to_a = within & (dd <= b_bound[cols])
            fwd.append(_capped(rows[to_b], a_ids, cols[to_b], b_ids, dd[to_b], k))
            back.append(_capped(cols[to_a], b_ids, rows[to_a], a_ids, dd[to_a], k))

    def _join(parts):
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    return _join(fwd), _join(back)


def _capped(src_rows, src_ids, dst_rows, dst_ids, dist, k):
    """Edges (by row positions) as ids; each src's k nearest if some src has more than k."""
    src, dst, dist = src_ids[src_rows], dst_ids[dst_rows], dist.astype(np.float32, copy=False)
    if len(src_rows) and np.bincount(src_rows).max() > k:
        return topk_edges(src, dst, dist, k)
    return src, dst, dist


def _topk_columns(d: np.ndarray, x_ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of `d` (distances >= 0 or inf, columns in ascending id order), the k
    smallest (distance, id) pairs in order, padded with (-1, inf).

    One uint64 key per entry (the float32 bits, which order like the values for
    non-negative floats, then the column index) makes every key unique, so a single
    partition and a sort of k keys per row replace argpartition + tie handling.
    """
    n, m = d.shape
    d = np.ascontiguousarray(d, np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    keys = (d.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(m, dtype=np.uint64)[None, :]
    if m > k:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    cols = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    dist = np.take_along_axis(d, cols, axis=1)
    ids = np.where(np.isinf(dist), PAD_ID, x_ids[cols])
    if m < k:
        ids = np.concatenate([ids, np.full((n, k - m), PAD_ID, np.int64)], axis=1)
        dist = np.concatenate([dist, np.full((n, k - m), np.inf, np.float32)], axis=1)
    return ids.astype(np.int64, copy=False), dist.astype(np.float32, copy=False)


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, num: int, chunk: int = 8192) -> np.ndarray:
    """Indices [n, num] of each row's `num` nearest centroids (squared Euclidean), nearest first."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    num = min(num, c.shape[0])
    c_sq = sq_norms(c)
    out = np.empty((x.shape[0], num), np.int64)
    for start in range(0, x.shape[0], chunk):
        # |x|^2 is constant per row: it does not change the ranking.
        d = c_sq[None, :] - 2.0 * (x[start:start + chunk] @ c.T)
        if num == 1:
            out[start:start + chunk, 0] = np.argmin(d, axis=1)
        else:
            part = np.argpartition(d, num - 1, axis=1)[:, :num]
            pd = np.take_along_axis(d, part, axis=1)
            out[start:start + chunk] = np.take_along_axis(part, np.argsort(pd, axis=1, kind="stable"), axis=1)
    return out


def kmeans(x: np.ndarray, num_centroids: int, iterations: int = 10, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means (float32) with a seeded k-means++-lite start; deterministic.

    The caller passes the sample in a canonical order (sorted by point id) so the
    result does not depend on how the pool was sharded.
    """
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    num_centroids = max(1, min(num_centroids, n))
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=num_centroids, replace=False))].copy()
    for _ in range(iterations):
        assign = nearest_centroids(x, centroids, 1)[:, 0]
        counts = np.bincount(assign, minlength=num_centroids)
        # Per-dimension bincounts: the same float64 sums as np.add.at, ~20x faster.
        sums = np.stack([np.bincount(assign, weights=x[:, j], minlength=num_centroids)
                         for j in range(x.shape[1])], axis=1) if x.shape[1] else np.zeros_like(centroids, np.float64)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        # An empty centroid restarts at the point farthest from its centroid.
        if not nonempty.all():
            d = sq_norms(x - centroids[assign])
            far = np.argsort(-d, kind="stable")[: int((~nonempty).sum())]
            centroids[~nonempty] = x[far]
    return centroids


def euclidean_radius(dist, metric: str, sq_norm) -> np.ndarray:
    """The Euclidean distance between prepared vectors that a `metric` distance
    `dist` (float32, as `pair_distances` computes it) stands for, rounded up for the
    float32 error of `dist` (float64; inf stays inf).

    cosine works on unit vectors, where |x - y|^2 = 2 (1 - x.y) = 2 dist; sqeuclidean
    is |x - y|^2 itself, whose float32 error grows with the squared norms (`_sq_slack`),
    and the other point's norm is at most |x| + |x - y|. `sq_norm` is |x|^2.
    """
    dist = np.maximum(np.asarray(dist, np.float64), 0.0)
    if metric == "cosine":
        sq = 2.0 * dist + 1e-5
    elif metric == "sqeuclidean":
        sq_norm = np.asarray(sq_norm, np.float64)
        with np.errstate(invalid="ignore"):
            other = (np.sqrt(sq_norm) + np.sqrt(dist)) ** 2
        sq = dist + 1e-5 * (1.0 + sq_norm + other)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return np.sqrt(sq)


def boundary_distances(x: np.ndarray, centroids: np.ndarray, own: np.ndarray) -> np.ndarray:
    """[n, P] float64: the distance from each row of `x` to the hyperplane that bisects
    its own centroid o = centroids[own[i]] and each centroid c,
    (|x - c|^2 - |x - o|^2) / (2 |c - o|), positive on o's side; -inf in the own
    column and for a centroid equal to o (no boundary: always searched).

    Any point y nearer to c than to o lies beyond that hyperplane, so
    |x - y| >= the distance: the cell of c cannot hold a point nearer to x than this.
    (|x|^2 cancels in the difference; computed in float64.)
    """
    c = np.asarray(centroids, np.float64)
    return _boundaries(np.asarray(x, np.float64), c, np.einsum("ij,ij->i", c, c), np.asarray(own, np.int64))[0]


def _boundaries(x, c, c_sq, own):
    """(`boundary_distances`, |c - o| [n, P]) in the dtype of `x`; the centroid gaps only
    for the own cells present (a cell's rows share one: P d work, not P^2 d)."""
    cells, inverse = np.unique(own, return_inverse=True)
    c_sq = c_sq.astype(x.dtype)
    c = c.astype(x.dtype)
    gap = np.sqrt(np.maximum(c_sq[cells][:, None] + c_sq[None, :] - 2.0 * (c[cells] @ c.T), 0.0))
    gap = gap[0][None, :] if len(cells) == 1 else gap[inverse]
    d_c = c_sq[None, :] - 2.0 * (x @ c.T)  # |x - c|^2 - |x|^2
    rows = np.arange(len(x))
    num = d_c - d_c[rows, own][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(gap > 0, num / (2.0 * np.where(gap > 0, gap, 1.0)), -np.inf)
    out[rows, own] = -np.inf
    return out, gap


def probe_cells(x: np.ndarray, centroids: np.ndarray, own: np.ndarray, radius: np.ndarray,
                num_probes: int, chunk: int = 4096) -> np.ndarray:
    """The other cells each row of `x` searches: [n, num_probes - 1] cell indices,
    nearest boundary first, padded with -1.

    A cell is searched only if its boundary with the row's own cell (`boundary_distances`)
    is within `radius` (the Euclidean distance of the row's k-th neighbour found in its
    own cell, `euclidean_radius`; inf searches the nearest boundaries regardless): a cell
    beyond cannot hold a point nearer than the k-th, so with `num_probes` = the number of
    cells the search is exact. The boundary is lowered by a float32 slack (the cells were
    assigned in float32, so a point may sit slightly on the wrong side of a boundary):
    the slack only adds cells, and covers the float32 arithmetic used here (relative
    error ~1e-6 of the squared norms, against a slack of 1e-4 of them).
    """
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float64)
    own = np.asarray(own, np.int64)
    radius = np.asarray(radius, np.float64)
    n, num_cells = len(x), len(c)
    width = max(0, min(num_probes - 1, num_cells - 1))
    out = np.full((n, width), PAD_ID, np.int64)
    if n == 0 or width == 0:
        return out
    c_sq = np.einsum("ij,ij->i", c, c)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        o = own[sl]
        h, g = _boundaries(x[sl], c, c_sq, o)
        x_norm = np.sqrt(np.einsum("ij,ij->i", x[sl], x[sl], dtype=np.float64))
        # Float32 assignment error of a point y on c's side: |y - c|^2 - |y - o|^2 may be
        # up to ~1e-5 (|y|^2 + |c|^2 + |o|^2) (generously), with |y| <= |x| + radius.
        r = radius[sl]
        with np.errstate(invalid="ignore", divide="ignore"):
            row_err = (1e-4 * ((x_norm + np.where(np.isfinite(r), r, 0.0)) ** 2 + 1.0 + c_sq[o])).astype(np.float32)
            err = row_err[:, None] + (1e-4 * c_sq).astype(np.float32)[None, :]
            low = np.where(g > 0, h - err / (np.float32(2.0) * np.where(g > 0, g, np.float32(1.0))), np.float32(-np.inf))
        low[np.arange(len(o)), o] = np.inf  # the own cell is searched anyway
        part = np.argpartition(low, width - 1, axis=1)[:, :width]  # width < num_cells: never the own cell
        part_low = np.take_along_axis(low, part, axis=1)
        # Nearest boundary first, ties by cell index.
        keys = np.lexsort((part, part_low), axis=1)
        part = np.take_along_axis(part, keys, axis=1)
        part_low = np.take_along_axis(part_low, keys, axis=1)
        out[sl] = np.where(part_low <= r[:, None], part, PAD_ID)
    return out


def dense_to_edges(q_ids: np.ndarray, nb_ids: np.ndarray, nb_dists: np.ndarray):
    """A padded top-k table as a sparse edge list (src, dst, dist) of its real entries."""
    real = nb_ids >= 0
    src = np.broadcast_to(np.asarray(q_ids, np.int64)[:, None], nb_ids.shape)[real]
    return src, nb_ids[real], nb_dists[real]


def topk_edges(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, k: int, distinct: bool = False):
    """Per src, its k nearest distinct dst (ties by id) from an edge list with repeats.

    A pair found in several block pairs / partitions appears more than once, maybe
    with distances that differ in the last float32 bits; the smallest is kept.
    `distinct=True` promises no (src, dst) repeats (exact kNN: every pair is computed
    once) and skips that step. The order is one two-key sort: (src rank, float32
    distance bits) packed in one uint64 (non-negative floats order like their bits),
    then dst. Edges come out sorted by (src, dist, dst).
    """
    if len(src) == 0:
        return src.astype(np.int64), dst.astype(np.int64), dist.astype(np.float32)
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    dist = np.asarray(dist, np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    if not distinct:
        # Repeats side by side, smallest distance first: keep that one.
        order = np.lexsort((dist, dst, src))
        src, dst, dist = src[order], dst[order], dist[order]
        first = np.ones(len(src), bool)
        first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
        src, dst, dist = src[first], dst[first], dist[first]
    rank = np.searchsorted(unique_sorted(src), src).astype(np.uint64)
    order = np.lexsort((dst, (rank << np.uint64(32)) | dist.view(np.uint32).astype(np.uint64)))
    src, dst, dist = src[order], dst[order], dist[order]
    starts = np.ones(len(src), bool)
    starts[1:] = src[1:] != src[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(src)), 0))
    keep = (np.arange(len(src)) - group_start) < k
    return src[keep], dst[keep], dist[keep]


def prune_tolerance(metric: str, max_dist: float) -> float:
    """Slack added to a float32 distance cut so no pair truly within `max_dist` is lost.

    Distances here are float32 (relative error ~1e-6 of the squared norms); the
    exact float64 linkage is recomputed afterwards and cut exactly.
    """
    return 1e-4 * max(1.0, abs(max_dist))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over rows of |approx & exact| / |exact| (padding ignored)."""
    hits, total = 0, 0
    for a, e in zip(approx_ids, exact_ids):
        e = e[e >= 0]
        if len(e) == 0:
            continue
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return float(hits) / total if total else 1.0


def prepared_vectors(block, dtype=np.float64) -> np.ndarray:
    """The vectors a point block stands for: raw float32 rows, L2-normalised
    (cosine) or centred on the pool mean (sqeuclidean), computed in float64 and
    rounded to float32.

    Blocks carry the raw rows (half the bytes of float64) plus how to prepare
    them, so the kNN stage and the clustering derive bit-identical vectors. The
    rounding makes the points float32 vectors for both (the clustering then does
    exact float64 arithmetic on them), and lets a singleton cluster's sum travel
    as float32 (`hac_kernels.Clusters.__reduce__`).
    """
    raw = np.asarray(block["vecs"], np.float64)
    if block.get("normalise"):
        out = normalise_rows(raw)[0]
    elif block.get("center") is not None:
        out = raw - np.asarray(block["center"], np.float64)[None, :]
    else:
        out = raw
    return out.astype(np.float32).astype(dtype, copy=False)
