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
            r"drop: got 'nope'; supported: \['bottom-fraction', 'neg-bottom', 'random', 'threshold', 'top-k'\]",
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
