"""In-memory baseline selectors of the label-efficiency benchmark (pure numpy).

These are the paper's comparison methods, kept out of the product on purpose: they
need the whole pool's embeddings on one machine, which is exactly what does not scale.

* `select_random`: a uniform draw from the unlabeled pool.
* `select_coreset`: k-center greedy (Sener & Savarese 2018) on penultimate-layer
  embeddings, Euclidean distance: the labeled set are the initial centers; each pick
  is the unlabeled point farthest from its nearest center.
* `select_badge`: BADGE (Ash et al. 2020): gradient embeddings of the last layer
  g_i = (p_i - onehot(argmax p_i)) (x) h_i (outer product; h = penultimate activations)
  and k-means++ seeding over the unlabeled pool: first the point of largest
  gradient norm (as in the authors' code), then each next point drawn with probability
  proportional to its squared distance to the nearest chosen point. The distance
  is computed from the factors, never materialising the [n, classes*d] embeddings:
  <a_i (x) h_i, a_j (x) h_j> = (a_i . a_j)(h_i . h_j).

Every selector takes `labeled` (bool mask over the pool) and returns `k` distinct
pool indices that are not labeled.
"""

from __future__ import annotations

import numpy as np


def _check(labeled: np.ndarray, k: int) -> np.ndarray:
    unlabeled = np.flatnonzero(~labeled)
    if k > unlabeled.size:
        raise ValueError(f"asked for {k} examples, only {unlabeled.size} unlabeled")
    return unlabeled


def select_random(labeled: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    unlabeled = _check(labeled, k)
    return np.sort(rng.choice(unlabeled, size=k, replace=False))


def _min_sq_dist_to(x: np.ndarray, centers: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each row of x, the squared Euclidean distance to its nearest row of `centers`."""
    x = x.astype(np.float64, copy=False)
    c = centers.astype(np.float64, copy=False)
    c_sq = np.einsum("ij,ij->i", c, c)
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], block):
        xb = x[start:start + block]
        d = np.einsum("ij,ij->i", xb, xb)[:, None] + c_sq[None, :] - 2.0 * xb @ c.T
        out[start:start + block] = d.min(axis=1)
    return np.maximum(out, 0.0)


def select_coreset(embeddings: np.ndarray, labeled: np.ndarray, k: int) -> np.ndarray:
    """k-center greedy: k unlabeled indices, each the farthest from the centers so far."""
    _check(labeled, k)
    x = embeddings.astype(np.float64)
    if labeled.any():
        min_d = _min_sq_dist_to(x, x[labeled])
    else:  # no centers yet: start from the point farthest from the mean
        min_d = np.sum((x - x.mean(axis=0)) ** 2, axis=1)
    min_d[labeled] = -1.0
    picks = np.empty(k, dtype=np.int64)
    for j in range(k):
        i = int(np.argmax(min_d))
        picks[j] = i
        d = np.sum((x - x[i]) ** 2, axis=1)
        np.minimum(min_d, d, out=min_d)
        min_d[i] = -1.0  # chosen: never again (distance 0 would tie with duplicates)
    return picks


def gradient_embedding_factors(embeddings: np.ndarray, probs: np.ndarray):
    """(a, h) with the BADGE gradient embedding g_i = a_i (x) h_i; a_i = p_i - onehot(argmax p_i)."""
    a = probs.astype(np.float64).copy()
    a[np.arange(a.shape[0]), np.argmax(probs, axis=1)] -= 1.0
    return a, embeddings.astype(np.float64)


def select_badge(embeddings: np.ndarray, probs: np.ndarray, labeled: np.ndarray, k: int,
                 rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding of k unlabeled points in gradient-embedding space."""
    unlabeled = _check(labeled, k)
    a, h = gradient_embedding_factors(embeddings[unlabeled], probs[unlabeled])
    a_sq = np.einsum("ij,ij->i", a, a)
    h_sq = np.einsum("ij,ij->i", h, h)
    norm_sq = a_sq * h_sq  # |a (x) h|^2 = |a|^2 |h|^2
    chosen = np.zeros(unlabeled.size, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    first = int(np.argmax(norm_sq))
    picks[0] = first
    chosen[first] = True

    def sq_dist_to(i: int) -> np.ndarray:
        return np.maximum(norm_sq + norm_sq[i] - 2.0 * (a @ a[i]) * (h @ h[i]), 0.0)

    min_d = sq_dist_to(first)
    min_d[chosen] = 0.0
    for j in range(1, k):
        total = min_d.sum()
        if total > 0:
            i = int(rng.choice(unlabeled.size, p=min_d / total))
        else:  # every remaining point coincides with a center: any unchosen one will do
            i = int(rng.choice(np.flatnonzero(~chosen)))
        picks[j] = i
        chosen[i] = True
        np.minimum(min_d, sq_dist_to(i), out=min_d)
        min_d[chosen] = 0.0
    return unlabeled[picks]
