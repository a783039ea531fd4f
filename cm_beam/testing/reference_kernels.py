"""Sequential references the tests (and benchmarks) compare the distributed kernels with.

They are the simple, whole-array versions of what the product does in blocks and
rounds across workers, kept out of the product's kernels because nothing in a
pipeline calls them.
"""

from typing import Tuple

import numpy as np

from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.selection import kernels as sk


def brute_force_topk(x: np.ndarray, ids: np.ndarray, k: int, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reference: every point's k nearest others, from the full distance matrix."""
    return kk.block_topk(x, ids, x, ids, k, metric, chunk=max(1, x.shape[0]))


def rnn_round(clusters: hk.Clusters, u: np.ndarray, v: np.ndarray, eps: float, metric: str, round_index: int = 0,
              tie_scale: float = 1.0):
    """One RNN round over the whole (in-memory) state.

    Returns (clusters after merging, edges u, v after relabelling, winners, losers, stats).
    Clusters with no candidate within eps are left in `clusters` untouched (they
    have no edges any more, so later rounds never see them).
    """
    n_edges = len(u)
    iu = hk.lookup(clusters.ids, u)
    iv = hk.lookup(clusters.ids, v)
    link = hk.edge_linkage(clusters, iu, clusters, iv, metric)
    keep = link <= eps
    u, v, link = u[keep], v[keep], link[keep]
    src, nn, _ = hk.nearest_candidates(np.concatenate([u, v]), np.concatenate([v, u]), np.concatenate([link, link]), round_index, tie_scale)
    winners, losers = hk.reciprocal_pairs(src, nn)
    clusters = hk.merge_clusters(clusters, winners, losers)
    order = np.argsort(losers, kind="stable")
    u, v = hk.relabel_edges(u, v, losers[order], winners[order])
    return clusters, u, v, winners, losers, hk.RoundStats(n_edges, len(src), len(winners))


def kth_smallest_in_memory(keys: np.ndarray, k: int) -> "sk.RadixState":
    """The whole radix selection on one array: for tests and small inputs."""
    state = sk.RadixState(k=k)
    while not state.done:
        state = sk.radix_step(sk.radix_histogram(keys, state), state)
    return state
