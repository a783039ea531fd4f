"""glibc malloc settings that keep local Beam runs from hoarding freed memory.

With the FnApiRunner/DirectRunner every PCollection between two stages passes
through the runner process as pickled bytes, handled by many gRPC threads. glibc
gives each thread its own malloc arena and raises its mmap threshold after large
frees, so hundreds of MB of freed blocks stay mapped in each arena. On the 1M-point
cm-cluster benchmark the runner process was the largest one of the job; its recorded
peak, with these settings and the other memory changes, is in
benchmarks/results/cluster.json.

The settings: at most 2 arenas, large blocks (>= 1 MB) always mmap'ed (so freeing
them returns the memory at once), and the heap trimmed above 4 MB of free space.
They are set in this process with mallopt(3) and, through the environment, in every
worker process a local runner starts. A value the user already set in the
environment wins; nothing happens off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

_LOG = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc malloc.h) and their environment spellings.
_SETTINGS = (
    ("MALLOC_ARENA_MAX", -8, 2),
    ("MALLOC_MMAP_THRESHOLD_", -3, 1 << 20),
    ("MALLOC_TRIM_THRESHOLD_", -1, 4 << 20),
)


@functools.lru_cache(maxsize=None)
def tune_malloc() -> bool:
    """Applies the settings once per process; returns whether glibc took them."""
    path = ctypes.util.find_library("c")
    if not path:
        return False
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    for env, param, value in _SETTINGS:
        if env in os.environ:
            continue  # the user's choice
        os.environ[env] = str(value)  # inherited by the worker processes of local runners
        ok = bool(mallopt(ctypes.c_int(param), ctypes.c_int(value))) and ok
    _LOG.debug("malloc settings applied: %s", ok)
    return ok
