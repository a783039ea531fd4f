"""benchmarks/cluster_bench.py's numpy adjusted Rand index (it scores the ivf partitions
against the exact ones where sklearn may not be installed)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cluster_bench as cb  # noqa: E402


def test_adjusted_rand_index_of_a_hand_example():
    # Contingency [[2, 1, 0], [0, 1, 2]]: index = C(2,2) + C(2,2) = 2; rows: 2 C(3,2) = 6;
    # columns: 3 C(2,2) = 3; expected 6 * 3 / C(6,2) = 1.2; max (6 + 3) / 2 = 4.5.
    a = [0, 0, 0, 1, 1, 1]
    b = [5, 5, 7, 7, 9, 9]
    assert cb.adjusted_rand_index(a, b) == pytest.approx((2 - 1.2) / (4.5 - 1.2), abs=1e-12)
    # Label values do not matter, only the partition; symmetric.
    assert cb.adjusted_rand_index(b, a) == pytest.approx(0.8 / 3.3, abs=1e-12)
    assert cb.adjusted_rand_index([3, 3, 1, 1], [0, 0, 8, 8]) == 1.0
    # Both one cluster, both all singletons: no pair to disagree on.
    assert cb.adjusted_rand_index([1, 1, 1], [2, 2, 2]) == 1.0
    assert cb.adjusted_rand_index([1, 2, 3], [4, 5, 6]) == 1.0
    # One cluster against all singletons: the index is 0 and so is its expectation.
    assert cb.adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    with pytest.raises(ValueError):
        cb.adjusted_rand_index([0, 1], [0, 1, 2])


def test_adjusted_rand_index_equals_sklearn_on_random_labelings():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, ka, kb in ((50, 3, 4), (2000, 40, 300), (500, 500, 2)):
        a = rng.integers(0, ka, n) * 1_000_003
        b = np.where(rng.random(n) < 0.7, a, rng.integers(0, kb, n))
        assert cb.adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-10)
