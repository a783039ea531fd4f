"""Uncertainty scores against direct definitions."""

import numpy as np
import pytest

from cm_beam.selection import uncertainty as unc


def test_margin_is_top1_minus_top2():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=200)
    s = np.sort(p, axis=1)
    np.testing.assert_allclose(unc.margin(p), s[:, -1] - s[:, -2])


def test_multilabel_margin_min_and_mean():
    p = np.array([[0.9, 0.5, 0.1], [1.0, 0.0, 0.75]])
    np.testing.assert_allclose(unc.multilabel_margin(p, "min"), [0.0, 0.5])
    np.testing.assert_allclose(unc.multilabel_margin(p, "mean"), [(0.8 + 0 + 0.8) / 3, (1 + 1 + 0.5) / 3])
    with pytest.raises(ValueError):
        unc.multilabel_margin(p, "max")


def test_entropy_and_least_confidence():
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(unc.entropy(p), [np.log(4), 0.0, np.log(2)])
    np.testing.assert_allclose(unc.least_confidence(p), [0.75, 0.0, 0.5])
    ml = np.array([[0.5, 1.0]])
    np.testing.assert_allclose(unc.entropy(ml, multilabel=True), [np.log(2)])


def test_priority_puts_most_uncertain_first_for_every_score():
    p = np.array([[0.34, 0.33, 0.33], [0.98, 0.01, 0.01]])
    for name in unc.UNCERTAINTIES:
        pr = unc.priority(unc.score(p, name), name)
        assert pr[0] < pr[1], name


def test_validate_probs_names_each_problem():
    p = np.array([[0.5, 0.5], [np.nan, 1.0], [1.2, -0.2], [0.3, 0.3], [0.5, 0.5004]])
    bad, reasons = unc.validate_probs(p)
    assert bad.tolist() == [False, True, True, True, False]
    assert "NaN" in reasons[1] and "outside" in reasons[2] and "sum to 0.6" in reasons[3]
    bad_ml, _ = unc.validate_probs(np.array([[0.3, 0.3]]), multilabel=True)
    assert not bad_ml.any()
    message = unc.describe_bad_rows(["a", "b", "c", "d", "e"], bad, reasons)
    assert message.startswith("3 invalid rows") and "b:" in message


def test_validate_scores():
    bad, reasons = unc.validate_scores(np.array([0.1, np.nan, 1.5, -0.1]), "margin")
    assert bad.tolist() == [False, True, True, True]
    bad, _ = unc.validate_scores(np.array([2.5, -1.0]), "entropy")
    assert bad.tolist() == [False, True]
