"""Sort-based numpy set operations for the pipeline's hot paths (no Beam import).

numpy >= 2.3 answers a plain `np.unique(a)` with a hash table. On int64 arrays like
cm-cluster's ids and shard numbers that is 4x (16 distinct values) to 68x (all
distinct) slower than sorting, which numpy vectorises (benchmarks/unique_bench.py,
results/unique.json, numpy 2.4; see numpy/numpy#28375 and #31970, which make the
choice adaptive). `unique_sorted` always sorts, on any numpy.
"""

from __future__ import annotations

import numpy as np


def unique_sorted(a) -> np.ndarray:
    """The distinct values of `a` in ascending order (what `np.unique(a)` returns)."""
    s = np.sort(np.asarray(a).ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
