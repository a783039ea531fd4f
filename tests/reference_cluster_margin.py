"""A plain, deliberately simple Cluster-Margin: the independent reference for cm-select.

It follows docs/design.md ("The margin pool", "Cluster-Margin round robin") step by
step with Python lists and dicts, sharing nothing with cm_beam's implementation
except the *definition* of the seeded tie-break and pick order (cm_beam.hashing with
the salts of the spec), which is part of the specification of a deterministic batch,
not of the algorithm.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import numpy as np

from cm_beam.hashing import hash_ids
from cm_beam.selection.select_impl import PICK_SALT, TIE_SALT, UNCLUSTERED_SALT


def reference_select(
    scores: Dict[str, float],
    clusters: Dict[str, int],
    excluded: Iterable[str],
    batch_size: int,
    margin_pool_size: int,
    seed: int = 0,
    strategy: str = "cluster_margin",
    larger_is_uncertain: bool = False,
) -> List[Tuple[str, int, int]]:
    """Returns [(example_id, cluster_id, round)] in selection order."""
    excluded = set(excluded)
    eligible = [e for e in scores if e not in excluded]
    tie = dict(zip(eligible, (int(h) >> 32 for h in hash_ids(eligible, seed, TIE_SALT)))) if eligible else {}
    pick = dict(zip(eligible, (int(h) for h in hash_ids(eligible, seed, PICK_SALT)))) if eligible else {}

    def priority(e):
        if strategy == "random":
            return 0.0
        s = float(np.float32(scores[e]))
        return -s if larger_is_uncertain else s

    ranked = sorted(eligible, key=lambda e: (priority(e), tie[e], e))
    k_m = margin_pool_size if strategy == "cluster_margin" else batch_size
    pool = ranked[:k_m]
    if strategy != "cluster_margin":
        return [(e, cluster_of(e, clusters), 0) for e in pool[:batch_size]]

    members: Dict[int, List[str]] = {}
    for e in pool:
        members.setdefault(cluster_of(e, clusters), []).append(e)
    for c in members:
        members[c].sort(key=lambda e: (pick[e], e))
    order = sorted(members, key=lambda c: (len(members[c]), c))
    chosen: List[Tuple[str, int, int]] = []
    r = 0
    while len(chosen) < min(batch_size, len(pool)):
        for c in order:
            if len(members[c]) > r:
                chosen.append((members[c][r], c, r))
                if len(chosen) == batch_size:
                    break
        r += 1
    return chosen


def cluster_of(example_id: str, clusters: Dict[str, int]) -> int:
    if example_id in clusters:
        return clusters[example_id]
    h = int(hash_ids([example_id], 0, UNCLUSTERED_SALT)[0]) >> 2
    return -1 - h
