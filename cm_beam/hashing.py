"""Seeded, platform-independent 64-bit hashes of example ids, vectorised in numpy.

Determinism across runners and worker counts needs tie-breaks and "random" choices
that depend only on (seed, example_id), never on arrival order or process state.
Python's `hash()` is salted per process, so we use FNV-1a over the UTF-8 bytes
followed by a splitmix64 finaliser (good avalanche, cheap), both written with numpy
uint64 arithmetic, which wraps modulo 2**64 as the algorithms need.

Pure numpy/pyarrow: no Beam import.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _seed_word(seed: int, salt: int) -> np.uint64:
    return _splitmix64(np.array([(int(seed) * 0x2545F4914F6CDD1D + salt) & _MASK64], dtype=np.uint64))[0]


def hash_ids(ids, seed: int = 0, salt: int = 0) -> np.ndarray:
    """Returns a uint64 hash per id; `ids` is a pyarrow string array or a sequence of str.

    `salt` separates independent uses of the same seed (e.g. the tie-break order and
    the within-cluster pick order must not be the same permutation).
    """
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.null_count:
        raise ValueError("example ids must not be null")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET ^ _seed_word(seed, salt), dtype=np.uint64)
    # Walk byte positions; rows shorter than the position drop out.  Ids are short
    # (tens of bytes), so this is a few dozen vectorised passes.
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    with np.errstate(over="ignore"):
        for pos in range(int(sorted_len[0]) if n else 0):
            k = int(np.searchsorted(-sorted_len, -pos, side="left"))  # rows with len > pos
            rows = order[:k]
            b = data[starts[rows] + pos].astype(np.uint64)
            h[rows] = (h[rows] ^ b) * _FNV_PRIME
    return _splitmix64(h ^ lengths.astype(np.uint64))


def hash_int64(values, seed: int = 0, salt: int = 0) -> np.ndarray:
    """Returns a uint64 hash per int64 value (e.g. cluster ids)."""
    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    return _splitmix64(v ^ _seed_word(seed, salt))
