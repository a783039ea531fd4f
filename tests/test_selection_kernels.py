"""The pure numpy kernels of selection, against brute force."""

import numpy as np
import pytest

from cm_beam.selection import kernels as sk
from cm_beam.testing import reference_kernels


def test_float32_order_bits_preserve_order():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 1.0, np.inf], dtype=np.float32)
    bits = sk.float32_order_bits(values)
    assert np.all(np.diff(bits.astype(np.int64)) >= 0)
    assert bits[3] == bits[4]  # -0.0 and 0.0 are the same priority
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000).astype(np.float32)
    assert np.array_equal(np.argsort(x, kind="stable"), np.argsort(sk.float32_order_bits(x), kind="stable"))


def test_int64_order_key_preserves_signed_order():
    v = np.array([-(2**62), -5, -1, 0, 1, 7, 2**62], dtype=np.int64)
    assert np.all(np.diff(sk.int64_order_key(v).astype(object)) > 0)


@pytest.mark.parametrize("k", [1, 2, 17, 500, 999, 1000])
def test_radix_selection_finds_kth_smallest(k):
    rng = np.random.default_rng(k)
    # Many duplicates, and values spread over the full 64-bit range.
    keys = np.concatenate([rng.integers(0, 2**63, size=600, dtype=np.uint64) * np.uint64(2),
                           np.full(400, 12345, dtype=np.uint64)])
    state = reference_kernels.kth_smallest_in_memory(keys, k)
    expected = np.sort(keys)[k - 1]
    assert state.prefix == int(expected)
    assert state.below == int((keys < expected).sum())
    assert state.below + state.k == k


def test_radix_selection_split_across_workers_matches():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64)
    parts = np.array_split(keys, 7)
    state = sk.RadixState(k=1234)
    while not state.done:
        state = sk.radix_step(sum(sk.radix_histogram(p, state) for p in parts), state)
    assert state.prefix == int(np.sort(keys)[1233])


def test_radix_selection_exhausted_when_too_few_keys():
    state = reference_kernels.kth_smallest_in_memory(np.arange(5, dtype=np.uint64), 10)
    assert state.exhausted


def brute_round_robin(sizes):
    """Rank of each (cluster, pass) pick by literally walking the passes."""
    order = sorted(range(len(sizes)), key=lambda c: (sizes[c], c))
    ranks, rank, r = {}, 0, 0
    while rank < sum(sizes):
        for c in order:
            if sizes[c] > r:
                ranks[(c, r)] = rank
                rank += 1
        r += 1
    return ranks


def test_selection_rank_formula_matches_walking_the_passes():
    rng = np.random.default_rng(1)
    sizes = list(rng.zipf(1.6, size=300).clip(1, 40))
    expected = brute_round_robin(sizes)
    hist = sk.SizeHistogram(sizes, np.ones(len(sizes), dtype=np.int64))
    order = sorted(range(len(sizes)), key=lambda c: (sizes[c], c))
    position = {c: i for i, c in enumerate(order)}
    for (c, r), rank in expected.items():
        assert int(sk.selection_rank(r, position[c], hist)) == rank
    assert hist.num_members == sum(sizes)
    for k_t in (1, 10, 299, 300, 301, 1000, sum(sizes)):
        passes = hist.passes_needed(k_t)
        used = {r for (c, r), rank in expected.items() if rank < k_t}
        assert passes == (max(used) + 1 if used else 0)


def test_bucket_layout_and_offsets_give_global_positions():
    rng = np.random.default_rng(2)
    n = 2000
    cluster = rng.zipf(1.5, size=n).astype(np.int64) % 400
    member_key = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    id_rank = rng.permutation(n)
    gkey = sk.int64_order_key(cluster)
    splitters = sk.splitters_from_sample(gkey[rng.choice(n, 200, replace=False)], 5)
    bucket = sk.bucket_of(gkey, splitters)
    triples, layouts = [], {}
    for b in np.unique(bucket):
        rows = np.flatnonzero(bucket == b)
        lay = sk.local_round_robin_layout(gkey[rows], member_key[rows], id_rank[rows], singletons=False)
        layouts[b] = (rows, lay)
        triples += [(b, s, c) for s, c in zip(*lay.size_counts)]
    offsets = sk.BucketOffsets(*map(np.array, zip(*triples)))
    sizes = np.bincount(cluster)
    present = np.flatnonzero(sizes)
    order = sorted(present, key=lambda c: (sizes[c], c))
    position = {c: i for i, c in enumerate(order)}
    for b, (rows, lay) in layouts.items():
        ordered = rows[lay.order]
        g = offsets.offset(int(b), lay.group_size) + lay.rank_in_size
        assert np.array_equal(g, [position[c] for c in cluster[ordered]])
        assert np.array_equal(lay.group_size, sizes[cluster[ordered]])
        # Members of a cluster are numbered 0..size-1 in member-key order.
        for c in np.unique(cluster[ordered]):
            sel = cluster[ordered] == c
            assert np.array_equal(lay.member_index[sel], np.arange(sel.sum()))
            assert np.all(np.diff(member_key[ordered][sel].astype(object)) >= 0)


def test_bottom_k_is_order_independent():
    rng = np.random.default_rng(4)
    h = rng.integers(0, 2**64 - 1, size=1000, dtype=np.uint64)
    v = np.arange(1000, dtype=np.uint64)
    a = sk.bottom_k(h, v, 50)
    perm = rng.permutation(1000)
    b = sk.bottom_k(h[perm], v[perm], 50)
    assert sorted(a[1].tolist()) == sorted(b[1].tolist())


@pytest.mark.parametrize("k", [1, 7, 500, 2999, 3000])
def test_prune_digit_keeps_every_key_of_the_k_smallest_and_no_more_bins(k):
    rng = np.random.default_rng(k)
    # Priorities with heavy ties and a spread of magnitudes (several digits).
    priority = np.round(rng.beta(0.5, 2.0, 3000), 3).astype(np.float32)
    keys = sk.order_key(priority, rng.integers(0, 2**63, 3000, dtype=np.uint64))
    digits = sk.priority_digit(priority)
    assert np.array_equal(digits, (keys >> np.uint64(48)).astype(np.int64)), "the digit is the key's top 16 bits"
    d = sk.prune_digit(np.bincount(digits, minlength=sk.RADIX_BINS), k)
    kth = np.sort(keys)[k - 1]
    assert (digits[keys <= kth] <= d).all()
    assert (digits < d).sum() < k, "the digit is the smallest that suffices"
    assert sk.prune_digit(np.bincount(digits, minlength=sk.RADIX_BINS), 3001) is None
    assert sk.prune_digit(None, k) is None


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_keys_give_the_median_rank(n):
    rng = np.random.default_rng(n)
    pool = rng.permutation(np.arange(1000, dtype=np.uint64) * np.uint64(3))  # distinct keys
    picks = rng.choice(pool, n, replace=False)
    ranks = [1 + int((pool < k).sum()) for k in picks]
    below = [int((pool < k).sum()) for k in sk.median_keys(picks)]
    assert np.mean(np.asarray(below) + 1) == np.median(ranks)
