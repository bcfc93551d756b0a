"""IIF selection rules on hand-made scores."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from rlattr.errors import RlattrError
from rlattr.rl.filtering import (
    BottomFraction,
    NegBottom,
    RandomDrop,
    SelectionRule,
    Threshold,
    TopK,
    make_rule,
)


def _paper_keep(scores: list[float], p: float) -> list[bool]:
    """Algorithm 1 of the paper, written out with plain Python lists."""
    n_neg = sum(1 for s in scores if s < 0)
    threshold = sorted(scores)[int(n_neg * p)]
    return [s >= threshold for s in scores]


SCORES = [2.0, -5.0, 0.5, -1.0, -3.0, 3.0, -4.0, -2.0, 1.0, -0.5]  # 6 negatives


@pytest.mark.parametrize("p", [0.0, 0.125, 0.25, 0.5, 0.75])
def test_neg_bottom_is_the_papers_threshold_rule(p: float) -> None:
    result = NegBottom(p)(torch.tensor(SCORES))
    assert result.keep.tolist() == _paper_keep(SCORES, p)


def test_neg_bottom_half_drops_the_three_most_negative() -> None:
    # 6 negatives, p = 0.5: threshold = sorted[3] = -2.0, so -5, -4, -3 go.
    result = NegBottom(0.5)(torch.tensor(SCORES))
    dropped = sorted(SCORES[i] for i in torch.nonzero(~result.keep).flatten().tolist())
    assert dropped == [-5.0, -4.0, -3.0]
    assert result.threshold == -2.0
    assert result.kept_fraction == pytest.approx(0.7)


def test_neg_bottom_p_one_drops_every_negative() -> None:
    result = NegBottom(1.0)(torch.tensor(SCORES))
    assert result.n_kept == 4 and all(SCORES[i] >= 0 for i in torch.nonzero(result.keep).flatten())


def test_min_keep_holds_when_every_score_is_negative() -> None:
    scores = torch.tensor([-1.0, -7.0, -0.25, -3.0, -0.5])
    result = NegBottom(1.0, min_keep=3)(scores)
    assert result.n_kept == 3
    assert sorted(scores[result.keep].tolist()) == [-1.0, -0.5, -0.25]
    assert "min_keep=3" in result.note


def test_random_drop_keeps_as_many_as_its_shadow() -> None:
    shadow = NegBottom(0.5)
    scores = torch.randn(500, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    result = RandomDrop(shadow, seed=3)(scores)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.n_kept == shadow(scores).n_kept
    assert not torch.equal(result.keep, shadow(scores).keep)


def test_random_drop_is_seeded_and_respects_min_keep() -> None:
    scores = torch.linspace(-1, 1, 40)
    a = RandomDrop(q=0.5, seed=7)(scores).keep
    b = RandomDrop(q=0.5, seed=7)(scores).keep
    assert torch.equal(a, b) and int(a.sum()) == 20
    floored = RandomDrop(q=1.0, seed=0, min_keep=5)(scores)
    # the base class's floor, as for every rule: the min_keep best-scored records, with a note
    assert floored.keep.nonzero().flatten().tolist() == [35, 36, 37, 38, 39]
    assert "min_keep=5" in floored.note


def test_other_rules() -> None:
    scores = torch.tensor([0.3, -0.2, 0.9, -0.8, 0.1])
    assert BottomFraction(0.4)(scores).keep.tolist() == [True, False, True, False, True]
    assert Threshold(0.2)(scores).keep.tolist() == [True, False, True, False, False]
    assert TopK(2)(scores).keep.tolist() == [True, False, True, False, False]


def test_make_rule_builds_a_shadowing_random_drop() -> None:
    rule = make_rule("random", like="neg-bottom", p=0.5, seed=1, min_keep=2)
    assert isinstance(rule, RandomDrop) and isinstance(rule.shadow, NegBottom)
    assert rule.shadow.p == 0.5 and rule.min_keep == 2 and rule.shadow.min_keep == 2
    shadowed = make_rule("random", like="top-k", k=3, seed=4)
    scores = torch.randn(10, generator=torch.Generator().manual_seed(1))
    kept = shadowed(scores).keep
    assert int(kept.sum()) == 3 and torch.equal(kept, RandomDrop(TopK(3), seed=4)(scores).keep)


@pytest.mark.parametrize(
    ("args", "direct"),
    [
        ({"drop": "neg-bottom", "p": 0.5}, NegBottom(0.5, min_keep=3)),
        ({"drop": "bottom-fraction", "q": 0.3}, BottomFraction(0.3, min_keep=3)),
        ({"drop": "threshold", "t": 0.1}, Threshold(0.1, min_keep=3)),
        ({"drop": "top-k", "k": 7}, TopK(7, min_keep=3)),
    ],
)
def test_make_rule_matches_the_rule_built_directly(args: dict[str, Any], direct: SelectionRule) -> None:
    rule = make_rule(**args, min_keep=3)
    scores = torch.randn(40, generator=torch.Generator().manual_seed(2))
    assert type(rule) is type(direct) and rule.config() == direct.config()
    assert torch.equal(rule(scores).keep, direct(scores).keep)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: make_rule("nope"),
            r"drop: got 'nope'; supported: \['adaptive', 'bottom-fraction', 'neg-bottom', 'random', 'threshold', 'top-k'\]",
        ),
        (lambda: make_rule("neg-bottom"), r"^p: got None; drop='neg-bottom' needs it$"),
        (lambda: make_rule("top-k", k=3, p=0.5), r"^p: got 0.5; drop='top-k' takes only k$"),
        (lambda: make_rule("random", like="random", p=0.5), r"^like: got 'random'; supported: \["),
        (lambda: make_rule("top-k", k=0), r"^k: must be an int >= 1, got 0$"),
        (lambda: NegBottom(1.5), r"^p: must be a fraction in \[0, 1\], got 1.5$"),
        (lambda: NegBottom(0.5, min_keep=0), r"^min_keep: must be an int >= 1, got 0$"),
        (lambda: NegBottom(0.5)(torch.tensor([1.0, math.nan])), r"^scores: contains NaN or inf"),
        (lambda: NegBottom(0.5)(torch.tensor([])), r"^scores: expected a non-empty Tensor\[n\], got \(0,\)$"),
    ],
)
def test_bad_input_is_named(build: Callable[[], object], match: str) -> None:
    with pytest.raises(RlattrError, match=match):
        build()


def _adaptive_by_hand(scores: list[float], f: float) -> tuple[list[bool], float]:
    """The adaptive rule written out: add the most negative scores one by one until their sum
    reaches f times the sum of all negatives; those are dropped."""
    negatives = sorted(s for s in scores if s < 0)
    goal, total, m = f * sum(negatives), 0.0, 0
    while m < len(negatives) and not (m > 0 and total <= goal):
        total += negatives[m]
        m += 1
    if f == 0 or not negatives:
        return [True] * len(scores), math.nan
    threshold = sorted(scores)[m]
    return [s >= threshold for s in scores], threshold


@pytest.mark.parametrize("f", [0.0, 0.2, 1 / 3, 0.5, 0.9, 1.0])
def test_adaptive_drops_the_fewest_negatives_reaching_the_gain_fraction(f: float) -> None:
    # negatives -5 -4 -3 -2 -1 -0.5: sum -15.5; the prefix sums are -5 -9 -12 -14 -15 -15.5
    result = make_rule("adaptive", f=f)(torch.tensor(SCORES))
    keep, threshold = _adaptive_by_hand(SCORES, f)
    assert result.keep.tolist() == keep
    assert result.threshold == threshold or (math.isnan(threshold) and math.isnan(result.threshold))


def test_adaptive_hand_computed_thresholds() -> None:
    scores = torch.tensor(SCORES)
    # f = 0.5: goal -7.75; -5 does not reach it, -5 - 4 = -9 does: drop 2, threshold = -3
    half = make_rule("adaptive", f=0.5)(scores)
    assert (half.n_dropped, half.threshold) == (2, -3.0)
    # f = 0.9: goal -13.95; four negatives sum to -14: drop 4, threshold = -1
    assert make_rule("adaptive", f=0.9)(scores).n_dropped == 4
    # one large negative carries most of the gain: drop it alone where neg-bottom 0.5 drops 3
    skewed = torch.tensor([1.0, -10.0, -0.1, -0.2, -0.3, -0.4, -0.5, 2.0])
    assert make_rule("adaptive", f=0.5)(skewed).n_dropped == 1
    assert NegBottom(0.5)(skewed).n_dropped == 3
    assert make_rule("adaptive", f=1.0)(torch.tensor([1.0, 2.0])).keep.all()  # no negatives: keep all


def test_adaptive_arguments_and_random_shadow() -> None:
    with pytest.raises(RlattrError, match=r"f: must be a fraction in \[0, 1\], got 1.5"):
        make_rule("adaptive", f=1.5)
    with pytest.raises(RlattrError, match="p: got 0.5; drop='adaptive' takes only f"):
        make_rule("adaptive", f=0.5, p=0.5)
    shadow = make_rule("random", f=0.5, like="adaptive", seed=3)(torch.tensor(SCORES))
    assert shadow.n_dropped == 2
    assert make_rule("adaptive", f=0.5).config() == {"rule": "adaptive", "min_keep": 1, "f": 0.5}
