"""Uncertainty scores of model outputs, as pure numpy functions (no Beam).

All functions take a 2-D array of probabilities, one row per example, and return
one float per row. Conventions (docs/design.md, "Uncertainty scores"):

* `margin` (multi-class): p(top1) - p(top2). Small = uncertain.
* `multilabel_margin`: per class |2 p_c - 1| (the margin of each independent binary
  problem), reduced over classes by `min` (default: the most uncertain class decides)
  or `mean`. Small = uncertain.
* `entropy`: -sum p log p (natural log). Large = uncertain.
* `least_confidence`: 1 - p(top1). Large = uncertain.

`priority` turns any of them into a key where *smaller is more uncertain*, so the
selection stage can sort once whatever the score. `validate_probs` finds the rows
that are not probabilities (NaN, outside [0, 1], multi-class rows that do not sum
to 1 within `sum_tolerance`) and says why, so callers can report them by example_id.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

UNCERTAINTIES = ("margin", "entropy", "least_confidence")
# How per-class multi-label margins reduce to one score (`multilabel_margin`).
MULTILABEL_REDUCES = ("min", "mean")
# Scores for which a larger value means more uncertain.
_LARGER_IS_UNCERTAIN = {"entropy": True, "least_confidence": True, "margin": False}
SUM_TOLERANCE = 1e-3


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D array (examples x classes), got shape {p.shape}")
    return p


def margin(probs) -> np.ndarray:
    """Multi-class margin p(top1) - p(top2); a single-class row has margin 1."""
    p = _as_probs(probs)
    if p.shape[1] == 0:
        return np.zeros(p.shape[0])
    if p.shape[1] == 1:
        return np.ones(p.shape[0])
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def multilabel_margin(probs, reduce: str = "min") -> np.ndarray:
    """Per-class binary margin |2 p_c - 1| reduced over classes by `min` or `mean`."""
    p = _as_probs(probs)
    per_class = np.abs(2.0 * p - 1.0)
    if reduce == "min":
        return per_class.min(axis=1) if p.shape[1] else np.ones(p.shape[0])
    if reduce == "mean":
        return per_class.mean(axis=1) if p.shape[1] else np.ones(p.shape[0])
    raise ValueError(f"reduce must be 'min' or 'mean', got {reduce!r}")


def entropy(probs, multilabel: bool = False) -> np.ndarray:
    """Shannon entropy in nats; for multi-label, the sum of the per-class binary entropies."""
    p = _as_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
        if multilabel:
            q = 1.0 - p
            plogp = plogp + np.where(q > 0, q * np.log(q), 0.0)
    return -plogp.sum(axis=1)


def least_confidence(probs, multilabel: bool = False) -> np.ndarray:
    """1 - p(top1); for multi-label, 1 - min over classes of max(p_c, 1 - p_c)."""
    p = _as_probs(probs)
    if multilabel:
        return 1.0 - np.maximum(p, 1.0 - p).min(axis=1)
    return 1.0 - p.max(axis=1)


def score(probs, uncertainty: str = "margin", multilabel: bool = False, reduce: str = "min") -> np.ndarray:
    """The named uncertainty of each row."""
    if uncertainty == "margin":
        return multilabel_margin(probs, reduce) if multilabel else margin(probs)
    if uncertainty == "entropy":
        return entropy(probs, multilabel)
    if uncertainty == "least_confidence":
        return least_confidence(probs, multilabel)
    raise ValueError(f"unknown uncertainty {uncertainty!r}; expected one of {', '.join(UNCERTAINTIES)}")


def priority(scores, uncertainty: str = "margin") -> np.ndarray:
    """A float32 key where smaller means more uncertain, for any named uncertainty."""
    s = np.asarray(scores, dtype=np.float32)
    return -s if _LARGER_IS_UNCERTAIN[uncertainty] else s


def validate_probs(probs, multilabel: bool = False, sum_tolerance: float = SUM_TOLERANCE) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (bad_mask, reasons): rows that are not valid probabilities and why.

    `reasons` is an object array with a message for each bad row and None elsewhere.
    """
    p = _as_probs(probs)
    n = p.shape[0]
    reasons = np.full(n, None, dtype=object)
    nonfinite = ~np.isfinite(p).all(axis=1)
    reasons[nonfinite] = "probabilities contain NaN or inf"
    with np.errstate(invalid="ignore"):
        out_of_range = ~nonfinite & ((p < 0) | (p > 1)).any(axis=1)
    reasons[out_of_range] = "probabilities outside [0, 1]"
    bad = nonfinite | out_of_range
    if not multilabel and p.shape[1] > 0:
        sums = np.where(bad, 1.0, p.sum(axis=1))
        not_normalised = ~bad & (np.abs(sums - 1.0) > sum_tolerance)
        for i in np.flatnonzero(not_normalised):
            reasons[i] = f"probabilities sum to {sums[i]:.6g}, not 1 (tolerance {sum_tolerance:g})"
        bad = bad | not_normalised
    return bad, reasons


def validate_scores(scores, uncertainty: str = "margin") -> Tuple[np.ndarray, np.ndarray]:
    """Returns (bad_mask, reasons) for precomputed scores: NaN/inf, or out of the score's range."""
    s = np.asarray(scores, dtype=np.float64)
    reasons = np.full(s.shape[0], None, dtype=object)
    nonfinite = ~np.isfinite(s)
    reasons[nonfinite] = f"{uncertainty} is NaN or inf"
    with np.errstate(invalid="ignore"):
        if uncertainty in ("margin", "least_confidence"):
            out = ~nonfinite & ((s < 0) | (s > 1))
            reasons[out] = f"{uncertainty} outside [0, 1]"
        else:
            out = ~nonfinite & (s < 0)
            reasons[out] = f"{uncertainty} is negative"
    return nonfinite | out, reasons


def describe_bad_rows(example_ids: Sequence[str], bad: np.ndarray, reasons: np.ndarray, limit: int = 5) -> Optional[str]:
    """A one-line summary naming the first offending example_ids, or None if none are bad."""
    idx = np.flatnonzero(bad)
    if idx.size == 0:
        return None
    shown = "; ".join(f"{example_ids[i]}: {reasons[i]}" for i in idx[:limit])
    more = f" (and {idx.size - limit} more)" if idx.size > limit else ""
    return f"{idx.size} invalid rows: {shown}{more}"
