"""Sort-based numpy set operations for the pipeline's hot paths (no Beam import).

numpy >= 2.3 answers a plain `np.unique(a)` with a hash table. On the id and shard
arrays of cm-cluster that is 4-30x slower than sorting (numpy's sort is SIMD
vectorised; the hash path is not): 2M ids with 100K distinct values took 0.98 s
against 0.03 s on the benchmark machine (numpy 2.4; see numpy/numpy#28375 and #31970,
which make the choice adaptive). `unique_sorted` always sorts, on any numpy.
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
