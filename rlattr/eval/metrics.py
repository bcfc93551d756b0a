"""Evaluation metrics for attribution scores: LDS, LOO correlation, mislabel-detection AUC.

Pure functions of arrays (``torch.Tensor`` or ``numpy.ndarray``), computed in float64 numpy.
Sign conventions: scores are positive when a record *helps* a query; ``loo_effects`` are the
change of the query's loss when the record is removed (positive = it helped); LDS ``targets`` are
a quantity the helpful records *raise* (e.g. minus the query loss, or the margin).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from rlattr.errors import RlattrError

ArrayLike = Tensor | np.ndarray


def _as_array(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise RlattrError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise RlattrError(f"{name}: contains NaN or inf")
    return arr


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along the last axis, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out[r] = (ends - (counts - 1) / 2.0)[inverse]
    return out.reshape(x.shape)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def _mean_or_all(values: np.ndarray, per_query: bool, name: str) -> float | np.ndarray:
    if per_query:
        return values
    if np.isnan(values).all():
        raise RlattrError(f"{name}: every query has a constant target or constant predictions")
    return float(np.nanmean(values))


def lds(
    scores: ArrayLike, masks: ArrayLike, targets: ArrayLike, *, per_query: bool = False
) -> float | np.ndarray:
    """Linear datamodeling score.

    Args:
        scores: ``[m, n]`` attribution of query j to training record i.
        masks: ``[M, n]`` 0/1, which records subset s kept.
        targets: ``[M, m]`` the query quantity after retraining on subset s (higher = helped).
    Returns the mean over queries (ignoring queries with constant targets) of the Spearman
    correlation, across subsets, between ``sum_{i in S_s} scores[j, i]`` and ``targets[s, j]``;
    ``per_query=True`` returns ``[m]``.
    """
    s = _as_array(scores, "scores", 2)
    mk = _as_array(masks, "masks", 2)
    t = _as_array(targets, "targets", 2)
    if mk.shape[1] != s.shape[1]:
        raise RlattrError(
            f"masks: expected [M, {s.shape[1]}] (one column per training record), got {mk.shape}"
        )
    if t.shape != (mk.shape[0], s.shape[0]):
        raise RlattrError(f"targets: expected [M, m] = {(mk.shape[0], s.shape[0])}, got {t.shape}")
    if mk.shape[0] < 3:
        raise RlattrError(f"masks: need at least 3 subsets for a rank correlation, got {mk.shape[0]}")
    predictions = mk @ s.T
    return _mean_or_all(spearman(predictions.T, t.T), per_query, "targets")


def loo_correlation(
    scores: ArrayLike, loo_effects: ArrayLike, *, per_query: bool = False
) -> float | np.ndarray:
    """Mean over queries of the Pearson correlation, across records, of scores and LOO effects.

    ``scores``, ``loo_effects``: ``[m, k]`` for the same k left-out records, in the same order.
    """
    s = _as_array(scores, "scores", 2)
    e = _as_array(loo_effects, "loo_effects", 2)
    if s.shape != e.shape:
        raise RlattrError(f"loo_effects: expected the shape of scores {s.shape}, got {e.shape}")
    if s.shape[1] < 2:
        raise RlattrError(f"scores: need at least 2 records per query, got {s.shape[1]}")
    return _mean_or_all(pearson(s, e), per_query, "loo_effects")


def mislabel_auc(scores: ArrayLike, flipped: ArrayLike) -> float:
    """ROC AUC of ``scores`` (higher = more suspicious, e.g. self-influence) for ``flipped`` labels.

    The Mann-Whitney statistic with average ranks for ties: the probability that a flipped
    record outscores a clean one (ties count half).
    """
    s = _as_array(scores, "scores", 1)
    f = _as_array(flipped, "flipped", 1)
    if f.shape != s.shape or not np.isin(f, (0.0, 1.0)).all():
        raise RlattrError(f"flipped: expected 0/1 (or bool) of shape {s.shape}, got shape {f.shape}")
    pos, neg = int(f.sum()), int((1 - f).sum())
    if pos == 0 or neg == 0:
        raise RlattrError("flipped: need at least one flipped and one clean record")
    ranks = rankdata(s)
    return float((ranks[f == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


__all__ = ["lds", "loo_correlation", "mislabel_auc", "pearson", "rankdata", "spearman"]
