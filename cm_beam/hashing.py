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


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _seed_word(seed: int, salt: int) -> np.uint64:
    return splitmix64(np.array([(int(seed) * 0x2545F4914F6CDD1D + salt) & _MASK64], dtype=np.uint64))[0]


def id_hash(ids) -> np.ndarray:
    """Unseeded uint64 hash of each id (FNV-1a over UTF-8 bytes, splitmix64-finalised).

    `ids` is a pyarrow string array or a sequence of str. Compute it once per row and
    derive every seeded hash from it with `derive`.
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
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    # Rows in chunks, longest first, bytes as a (rows x longest) matrix: at byte
    # position p the rows still going are a prefix, so each pass is a slice, not a
    # gather. Memory stays bounded by the chunk whatever the id lengths.
    chunk = max(1, (1 << 24) // max(1, int(lengths.max())))
    with np.errstate(over="ignore"):
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            order = lo + np.argsort(-lengths[lo:hi], kind="stable")
            lens = lengths[order]
            width = int(lens[0])
            if width == 0:
                continue
            cols = np.arange(width)
            idx = np.minimum(offsets[order][:, None] + cols[None, :], data.size - 1)
            block = data[idx].astype(np.uint64)
            active = np.searchsorted(-lens, -cols, side="left")  # rows with length > pos
            hc = h[order]
            for pos in range(width):
                k = int(active[pos])
                hc[:k] = (hc[:k] ^ block[:k, pos]) * _FNV_PRIME
            h[order] = hc
    return splitmix64(h ^ lengths.astype(np.uint64))


def derive(base: np.ndarray, seed: int = 0, salt: int = 0) -> np.ndarray:
    """A seeded hash from an `id_hash`: independent streams for each (seed, salt)."""
    return splitmix64(np.asarray(base, dtype=np.uint64) ^ _seed_word(seed, salt))


def hash_ids(ids, seed: int = 0, salt: int = 0) -> np.ndarray:
    """Returns a seeded uint64 hash per id: `derive(id_hash(ids), seed, salt)`.

    `salt` separates independent uses of the same seed (e.g. the tie-break order and
    the within-cluster pick order must not be the same permutation).
    """
    return derive(id_hash(ids), seed, salt)
