"""Golden values of the id hashes (cm_beam/hashing.py).

These hashes decide persisted results: a cluster's public id is the smallest
`hash_ids(member, 0, _SALT_ID) >> 1` of its members (cm-cluster writes it, later
nights reuse it), and cm-select's tie-break order, within-cluster pick order and
join buckets are seeded hashes of example_id. Changing the hash function (or a
salt) silently changes every stored cluster id and every batch, so the expected
outputs below are hard-coded: they were computed once from the implementation and
are cross-checked against a plain-Python FNV-1a + splitmix64 written from the
definitions, independently of the vectorised numpy code.
"""

import numpy as np
import pytest

from cm_beam import hashing
from cm_beam.clustering import build_clusters as cl
from cm_beam.clustering import hac_kernels as hk
from cm_beam.selection import select_impl as si

IDS = ["", "a", "img-000001", "gs://bucket/pool/00042.jpg", "é✓"]

GOLDEN_ID_HASH = [0xC3817C016BA4FF30, 0xC0FC99FEA7AB959C, 0x8EF871B0A87E24BC, 0x6210EFDBE0FC3620, 0x0E01A65266DD978C]

# (seed, salt) -> hash_ids(IDS, seed, salt)
GOLDEN_SEEDED = {
    (0, 11): [0x7F9194E5A759F63B, 0x6B61B84C64EEFA91, 0x591D5AC0C5EAE14F, 0x474B44B10348E184, 0xC31BAEE5AFDF766B],
    (7, 1): [0x12116BCA55AE4CAB, 0x5D4A6105614835EF, 0xA299779A7D779E94, 0x913B9BBD7231005E, 0xB30870B77F9E6581],
    (7, 2): [0x081372EF03F40077, 0xDCF770C2D5108A89, 0x89C631B0F2EF1900, 0x3E426A09B2FE422E, 0x24D05B4CD519E05B],
    (0, 3): [0xC4F3E1E75B40310B, 0xE8248312655BF4DE, 0x1BE5046DE8469156, 0x1FB8127EED673B9D, 0x483F9C80931F4857],
}

# Public cluster id of each id as a singleton (what clusters-*.parquet stores).
GOLDEN_SINGLETON_CLUSTER_IDS = [4596146014258002717, 3868834136524815688, 3210694213850460327,
                                2568637663500595394, 7029511481644268341]


M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _plain_id_hash(s: str) -> int:
    data = s.encode("utf-8")
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    return splitmix64(h ^ len(data))


def _plain_seeded(s: str, seed: int, salt: int) -> int:
    word = splitmix64((seed * 0x2545F4914F6CDD1D + salt) & M64)
    return splitmix64(_plain_id_hash(s) ^ word)


def test_salts_used_by_the_pipelines_are_the_golden_ones():
    # The golden table covers the salts that decide persisted outputs.
    assert cl._SALT_ID == 11
    assert (si.TIE_SALT, si.PICK_SALT, si.JOIN_SALT) == (1, 2, 3)


def test_id_hash_golden():
    got = [int(x) for x in hashing.id_hash(IDS)]
    assert got == GOLDEN_ID_HASH
    assert got == [_plain_id_hash(s) for s in IDS]


@pytest.mark.parametrize("seed,salt", sorted(GOLDEN_SEEDED))
def test_seeded_hash_golden(seed, salt):
    got = [int(x) for x in hashing.hash_ids(IDS, seed=seed, salt=salt)]
    assert got == GOLDEN_SEEDED[(seed, salt)]
    assert got == [_plain_seeded(s, seed, salt) for s in IDS]


def test_singleton_cluster_ids_golden():
    hashes = hashing.hash_ids(IDS, seed=0, salt=cl._SALT_ID)
    assert hk.public_labels(hashes).tolist() == GOLDEN_SINGLETON_CLUSTER_IDS
    assert all(0 <= c < 2**63 for c in GOLDEN_SINGLETON_CLUSTER_IDS)


def test_chunked_and_long_ids_hash_like_short_lists():
    # The vectorised code groups rows by length in chunks: order and mixing of
    # lengths must not change any row's hash.
    ids = [("x" * n) + str(i) for i, n in enumerate([0, 300, 1, 5000, 2, 17])]
    got = [int(x) for x in hashing.id_hash(ids)]
    assert got == [_plain_id_hash(s) for s in ids]
    assert got[::-1] == [int(x) for x in hashing.id_hash(ids[::-1])]
