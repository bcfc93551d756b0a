"""Selection rules for iterative influence-based filtering (IIF).

A rule looks at one round's scores (positive = the record helps the target) and decides which
records the update keeps. Every rule keeps at least ``min_keep`` records: when it would keep
fewer, it keeps the ``min_keep`` best-scored ones instead and says so in ``FilterResult.note``.
Rules are pure functions of the scores (and, for :class:`RandomDrop`, of their own seeded
generator): they never touch the global RNG, so filtering does not perturb the training run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlattr.errors import RlattrError


@dataclass
class FilterResult:
    """What a rule decided for one round.

    Attributes:
        keep: ``Tensor[n]`` of bool, True for kept records (in the order of the scores given).
        threshold: the score below which records were dropped (``nan`` when not threshold-based).
        note: a human-readable remark, e.g. that ``min_keep`` overrode the rule; empty otherwise.
    """

    keep: Tensor
    threshold: float = math.nan
    note: str = ""

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    @property
    def n_dropped(self) -> int:
        return int((~self.keep).sum())

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / max(1, self.keep.numel())


def _check_scores(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RlattrError(f"scores: expected a non-empty Tensor[n], got {shape}")
    if not torch.isfinite(scores).all():
        raise RlattrError("scores: contains NaN or inf; refusing to filter on them")
    return scores.detach().double().cpu()


def _keep_best(scores: Tensor, k: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return keep


class SelectionRule(ABC):
    """Base class: ``rule(scores) -> FilterResult``; subclasses implement :meth:`_keep`."""

    name = "rule"

    def __init__(self, *, min_keep: int = 1) -> None:
        if not isinstance(min_keep, int) or min_keep < 1:
            raise RlattrError(f"min_keep: must be an int >= 1, got {min_keep!r}")
        self.min_keep = min_keep

    @abstractmethod
    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        """Keep mask and threshold for float64 CPU scores."""

    def __call__(self, scores: Tensor) -> FilterResult:
        s = _check_scores(scores)
        keep, threshold = self._keep(s)
        floor = min(self.min_keep, s.numel())
        if int(keep.sum()) < floor:
            note = (
                f"{self.name}: would keep {int(keep.sum())} of {s.numel()} records, fewer than "
                f"min_keep={self.min_keep}; keeping the {floor} best-scored records instead"
            )
            return FilterResult(_keep_best(s, floor), threshold, note)
        return FilterResult(keep, threshold)

    def config(self) -> dict[str, Any]:
        return {"rule": self.name, "min_keep": self.min_keep}


def _fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RlattrError(f"{name}: must be a fraction in [0, 1], got {value!r}")
    return float(value)


class NegBottom(SelectionRule):
    """The paper's rule (Algorithm 1): drop the most negative ``p`` fraction of the negative records.

    ``threshold = sorted(scores)[int(n_negative * p)]``; records scoring below it are dropped.
    ``p = 1`` drops every negative record.
    """

    name = "neg-bottom"

    def __init__(self, p: float, *, min_keep: int = 1) -> None:
        super().__init__(min_keep=min_keep)
        self.p = _fraction("p", p)

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        n_neg = int((scores < 0).sum())
        idx = int(n_neg * self.p)
        ordered = torch.sort(scores).values
        if idx >= scores.numel():
            return torch.zeros_like(scores, dtype=torch.bool), math.inf
        threshold = float(ordered[idx])
        return scores >= threshold, threshold

    def config(self) -> dict[str, Any]:
        return {**super().config(), "p": self.p}


class AdaptiveNegBottom(SelectionRule):
    """Adaptive drop size: drop the fewest most-negative records that carry a fraction ``f`` of the
    predicted first-order gain of dropping every negative one.

    Dropping a record changes the target by about minus its score (first order), so dropping all
    negatives is predicted to raise it by ``G = -sum(scores[scores < 0])``. With the negatives sorted
    ascending, ``m`` is the smallest count whose prefix sum is ``<= f * sum(negatives)``; those ``m``
    are dropped and ``threshold = sorted(scores)[m]``. A round with a few large negatives drops few
    records, a round of many small ones drops many. ``f = 0`` keeps every record, ``f = 1`` drops every
    negative; a round without negatives keeps everything.
    """

    name = "adaptive"

    def __init__(self, f: float, *, min_keep: int = 1) -> None:
        super().__init__(min_keep=min_keep)
        self.f = _fraction("f", f)

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        ordered = torch.sort(scores).values
        negatives = ordered[ordered < 0]
        if negatives.numel() == 0 or self.f == 0.0:
            return torch.ones_like(scores, dtype=torch.bool), math.nan
        gain = -torch.cumsum(negatives, 0)  # predicted gain of dropping the m most negative, m = 1..
        goal = self.f * float(gain[-1]) * (1 - 1e-12)  # the tolerance keeps f = 1 from missing by rounding
        m = min(int((gain < goal).sum()) + 1, negatives.numel())
        if m >= scores.numel():
            return torch.zeros_like(scores, dtype=torch.bool), math.inf
        threshold = float(ordered[m])
        return scores >= threshold, threshold

    def config(self) -> dict[str, Any]:
        return {**super().config(), "f": self.f}


class BottomFraction(SelectionRule):
    """Drop the ``q`` fraction of records with the lowest scores, whatever their sign."""

    name = "bottom-fraction"

    def __init__(self, q: float, *, min_keep: int = 1) -> None:
        super().__init__(min_keep=min_keep)
        self.q = _fraction("q", q)

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        n_drop = int(scores.numel() * self.q)
        keep = torch.ones_like(scores, dtype=torch.bool)
        order = torch.argsort(scores, stable=True)
        keep[order[:n_drop]] = False
        threshold = float(scores[order[n_drop]]) if n_drop < scores.numel() else math.inf
        return keep, threshold

    def config(self) -> dict[str, Any]:
        return {**super().config(), "q": self.q}


class Threshold(SelectionRule):
    """Drop every record whose score is below ``t``."""

    name = "threshold"

    def __init__(self, t: float, *, min_keep: int = 1) -> None:
        super().__init__(min_keep=min_keep)
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise RlattrError(f"t: must be a finite number, got {t!r}")
        self.t = float(t)

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        return scores >= self.t, self.t

    def config(self) -> dict[str, Any]:
        return {**super().config(), "t": self.t}


class TopK(SelectionRule):
    """Keep the ``k`` best-scored records (ties broken by position)."""

    name = "top-k"

    def __init__(self, k: int, *, min_keep: int = 1) -> None:
        super().__init__(min_keep=min_keep)
        if not isinstance(k, int) or k < 1:
            raise RlattrError(f"k: must be an int >= 1, got {k!r}")
        self.k = k

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        keep = _keep_best(scores, min(self.k, scores.numel()))
        return keep, float(scores[keep].min())

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k}


class RandomDrop(SelectionRule):
    """Baseline: drop as many records as ``shadow`` would (or a fraction ``q``), chosen at random.

    Uses its own ``torch.Generator`` seeded with ``seed``; the global RNG is untouched. A shadow
    built with the same ``min_keep`` never drops below it; with ``q``, the base class's ``min_keep``
    floor applies as for every rule.
    """

    name = "random"

    def __init__(
        self, shadow: SelectionRule | None = None, *, q: float | None = None, seed: int = 0, min_keep: int = 1
    ) -> None:
        super().__init__(min_keep=min_keep)
        if (shadow is None) == (q is None):
            raise RlattrError("RandomDrop: give exactly one of shadow (a SelectionRule) or q (a fraction)")
        if shadow is not None and not isinstance(shadow, SelectionRule):
            raise TypeError(f"shadow: expected a SelectionRule, got {type(shadow).__name__}")
        self.shadow = shadow
        self.q = None if q is None else _fraction("q", q)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)

    def _keep(self, scores: Tensor) -> tuple[Tensor, float]:
        n = scores.numel()
        n_drop = self.shadow(scores).n_dropped if self.shadow is not None else int(n * (self.q or 0.0))
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=self.generator)[:n_drop]] = False
        return keep, math.nan

    def config(self) -> dict[str, Any]:
        shadow = self.shadow.config() if self.shadow is not None else None
        return {**super().config(), "shadow": shadow, "q": self.q, "seed": self.seed}


RULES: dict[str, type[SelectionRule]] = {
    cls.name: cls for cls in (NegBottom, AdaptiveNegBottom, BottomFraction, Threshold, TopK, RandomDrop)
}


# the one parameter each score-based rule takes (the value goes to the rule's own check); "random"
# shadows one of them
RULE_PARAMETER: dict[str, tuple[str, Callable[[Any, int], SelectionRule]]] = {
    NegBottom.name: ("p", lambda value, min_keep: NegBottom(value, min_keep=min_keep)),
    AdaptiveNegBottom.name: ("f", lambda value, min_keep: AdaptiveNegBottom(value, min_keep=min_keep)),
    BottomFraction.name: ("q", lambda value, min_keep: BottomFraction(value, min_keep=min_keep)),
    Threshold.name: ("t", lambda value, min_keep: Threshold(value, min_keep=min_keep)),
    TopK.name: ("k", lambda value, min_keep: TopK(value, min_keep=min_keep)),
}


def soft_weights(scores: Tensor, keep: Tensor) -> Tensor:
    """Per-record loss weights in [0, 1] that soften a rule's drop: a kept record weighs 1, a dropped
    one ``1 - s / s_min`` (``s_min`` the round's lowest score), so its weight falls linearly with its
    score from about 1 near zero to 0 at the most negative record. Dropping a record changes the
    target by about minus its score (first order), so a weight takes away that share of it.

    Args:
        scores: ``Tensor[n]``, one score per record (positive = helps the target).
        keep: ``Tensor[n]`` of bool, what the rule keeps.
    """
    s = _check_scores(scores)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != s.shape:
        got = (keep.dtype, tuple(keep.shape)) if isinstance(keep, Tensor) else type(keep).__name__
        raise RlattrError(f"keep: expected a bool Tensor of shape {tuple(s.shape)}, got {got}")
    weights = torch.ones_like(s)
    s_min = float(s.min())
    if s_min < 0:
        dropped = ~keep.cpu()
        weights[dropped] = (1.0 - s[dropped] / s_min).clamp(0.0, 1.0)
    return weights


def systematic_counts(weights: Tensor, total: int, offset: float) -> Tensor:
    """How many times each record appears in ``total`` draws by systematic resampling.

    Record i's expected count is ``e_i = total * w_i / sum(w)``; systematic resampling (one uniform
    ``offset`` in [0, 1) for all records) gives it ``floor(c_i + offset) - floor(c_(i-1) + offset)``
    with ``c_i = e_1 + ... + e_i``, which is ``floor(e_i)`` or ``ceil(e_i)``, and the counts add up to
    ``total`` exactly. A training epoch over the resampled records is then, summed over its
    minibatches, the loss weighted by ``w`` up to the rounding of the counts.

    Args:
        weights: ``Tensor[n]`` of non-negative finite weights, not all zero.
        total: how many draws (>= 1).
        offset: the systematic offset, in [0, 1).
    """
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() == 0:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise RlattrError(f"weights: expected a non-empty Tensor[n], got {shape}")
    w = weights.detach().double().cpu()
    if not torch.isfinite(w).all() or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise RlattrError("weights: must be finite and non-negative with a positive sum")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise RlattrError(f"total: expected an int >= 1, got {total!r}")
    if not isinstance(offset, (int, float)) or not 0.0 <= float(offset) < 1.0:
        raise RlattrError(f"offset: expected a number in [0, 1), got {offset!r}")
    edges = torch.cumsum(w, 0) * (total / float(w.sum()))
    edges[-1] = float(total)  # the sum is total exactly, whatever the rounding of the cumsum
    cut = torch.floor(edges + float(offset)).long().clamp(max=total)
    return torch.diff(cut, prepend=torch.zeros(1, dtype=torch.long))


def make_rule(
    drop: str,
    *,
    p: float | None = None,
    q: float | None = None,
    t: float | None = None,
    k: int | None = None,
    f: float | None = None,
    seed: int = 0,
    min_keep: int = 1,
    like: str = NegBottom.name,
) -> SelectionRule:
    """Build a selection rule from arguments; the one factory both adapters call.

    ``drop`` names the rule and takes its one parameter: ``"neg-bottom"`` p, ``"adaptive"`` f (the
    fraction of the predicted first-order gain to drop), ``"bottom-fraction"`` q,
    ``"threshold"`` t, ``"top-k"`` k. ``"random"`` is a :class:`RandomDrop` that drops as many
    records as the rule ``like`` (default ``"neg-bottom"``) built from the same parameter would,
    from its own generator seeded with ``seed``: ``make_rule("random", p=0.5, seed=0)``.
    Giving a parameter the rule does not use is an error rather than silently ignored.
    """
    if drop not in RULES:
        raise RlattrError(f"drop: got {drop!r}; supported: {sorted(RULES)}")
    base = like if drop == RandomDrop.name else drop
    if base not in RULE_PARAMETER:
        raise RlattrError(f"like: got {like!r}; supported: {sorted(RULE_PARAMETER)}")
    pairs = (("p", p), ("q", q), ("t", t), ("k", k), ("f", f))
    given = {name: value for name, value in pairs if value is not None}
    wanted, build = RULE_PARAMETER[base]
    for name in sorted(set(given) - {wanted}):
        raise RlattrError(f"{name}: got {given[name]!r}; drop={drop!r} takes only {wanted}")
    if wanted not in given:
        raise RlattrError(f"{wanted}: got None; drop={drop!r} needs it")
    rule = build(given[wanted], min_keep)
    return RandomDrop(rule, seed=seed, min_keep=min_keep) if drop == RandomDrop.name else rule
