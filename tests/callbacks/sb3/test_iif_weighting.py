"""IIF's decision as weights instead of a drop: ``weighting="refill"`` and ``weighting="soft"``.

The weights reach SB3's unmodified ``train()`` as multiplicities: the buffer is resampled
(systematically) back to the round's record count. Checked against the resampling and the soft
weights written out by hand, and against the samples ``train()`` actually draws.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from rlattr.callbacks import IIFCallback
from rlattr.callbacks.sb3.iif import compact_rollout_buffer
from rlattr.errors import RlattrError
from rlattr.rl.filtering import NegBottom, soft_weights, systematic_counts
from tests.callbacks.sb3.test_iif import (
    N_ENVS,
    N_STEPS,
    _filled_buffer,
    _model,
    _record_key,
    _spy_train_samples,
)

SCORES = [2.0, -5.0, 0.5, -1.0, -3.0, 3.0, -4.0, -2.0, 1.0, -0.5]  # neg-bottom 0.5 drops -5, -4, -3


def _systematic_by_hand(weights: list[float], total: int, offset: float) -> list[int]:
    """Systematic resampling written out: walk the cumulative expected counts, cut at offset + j."""
    counts, cumulative, previous = [], 0.0, 0
    for i, w in enumerate(weights):
        cumulative = float(total) if i == len(weights) - 1 else cumulative + total * w / sum(weights)
        cut = math.floor(cumulative + offset)
        counts.append(cut - previous)
        previous = cut
    return counts


class _Recording(IIFCallback):
    """Keeps every round's records and scores (the callback itself keeps only the last round's)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[Any, list[float]]] = []

    def _on_round_scored(self, records: Any, scores: Any) -> None:
        self.rounds.append((records, scores.scores.double().tolist()))
        super()._on_round_scored(records, scores)


def _soft_by_hand(scores: list[float], keep: list[bool]) -> list[float]:
    lowest = min(scores)
    return [1.0 if k or lowest >= 0 else 1.0 - s / lowest for s, k in zip(scores, keep, strict=True)]


def test_soft_weights_fall_linearly_to_zero_at_the_most_negative_dropped_record() -> None:
    keep = NegBottom(0.5)(torch.tensor(SCORES)).keep
    weights = soft_weights(torch.tensor(SCORES), keep)
    # dropped: -5 (weight 0), -4 (1 - 4/5 = 0.2), -3 (0.4); every kept record weighs 1
    assert weights.tolist() == pytest.approx([1, 0.0, 1, 1, 0.4, 1, 0.2, 1, 1, 1])
    assert weights.tolist() == pytest.approx(_soft_by_hand(SCORES, keep.tolist()))
    assert soft_weights(torch.tensor([1.0, 2.0]), torch.tensor([True, False])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("weights", "total", "offset", "expected"),
    [
        ([1.0, 0.0, 2.0, 1.0], 8, 0.5, [2, 0, 4, 2]),  # integer expected counts: exact
        ([1.0, 1.0, 1.0], 4, 0.25, [1, 1, 2]),  # 4/3 each: cumulative 1.33, 2.67, 4
        ([1.0, 1.0, 1.0], 4, 0.9, [2, 1, 1]),
        ([0.0, 0.2, 0.4, 1.0], 5, 0.0, [0, 0, 1, 4]),  # expected 0, 0.625, 1.25, 3.125
    ],
)
def test_systematic_counts_match_the_hand_walk(
    weights: list[float], total: int, offset: float, expected: list[int]
) -> None:
    counts = systematic_counts(torch.tensor(weights), total, offset).tolist()
    assert counts == expected == _systematic_by_hand(weights, total, offset)


def test_systematic_counts_round_the_expected_counts_and_add_up() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.rand(50, generator=g) * (torch.rand(50, generator=g) > 0.3)
        u = float(torch.rand(1, generator=g))
        counts = systematic_counts(w, 64, u)
        assert counts.tolist() == _systematic_by_hand(w.tolist(), 64, u)
        expected = 64 * w.double() / w.double().sum()
        assert int(counts.sum()) == 64
        assert bool(
            ((counts >= torch.floor(expected) - 1e-9) & (counts <= torch.ceil(expected) + 1e-9)).all()
        )


def test_bad_weights_and_counts_are_named() -> None:
    with pytest.raises(RlattrError, match="^weights: must be finite and non-negative"):
        systematic_counts(torch.tensor([1.0, -1.0]), 4, 0.0)
    with pytest.raises(RlattrError, match="^weights: must be finite and non-negative"):
        systematic_counts(torch.zeros(3), 4, 0.0)
    with pytest.raises(RlattrError, match=r"^total: expected an int >= 1, got 0$"):
        systematic_counts(torch.ones(3), 0, 0.0)
    with pytest.raises(RlattrError, match=r"^offset: expected a number in \[0, 1\), got 1.0$"):
        systematic_counts(torch.ones(3), 4, 1.0)
    with pytest.raises(RlattrError, match=r"^keep: expected a bool Tensor of shape \(2,\)"):
        soft_weights(torch.ones(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(
        RlattrError, match=r"^weighting: got 'scale'; supported: \['drop', 'refill', 'soft'\]$"
    ):
        IIFCallback(weighting="scale")
    with pytest.raises(RlattrError, match="^weighting: got 'soft' with rescore='epoch'"):
        IIFCallback(weighting="soft", rescore="epoch")


def test_compaction_takes_record_positions_with_repeats() -> None:
    buf = _filled_buffer(False)
    positions = np.array([3, 3, 0, 11, 3])
    compact_rollout_buffer(buf, positions)
    assert (buf.buffer_size, buf.n_envs, buf.pos) == (5, 1, 5)
    np.testing.assert_array_equal(buf.values[:, 0], positions)
    drawn = np.concatenate([d.old_values.numpy() for d in buf.get(2)])
    assert sorted(drawn.tolist()) == sorted(positions.tolist())
    with pytest.raises(RlattrError, match=r"^keep: record positions must lie in \[0, 5\), got 0..5$"):
        compact_rollout_buffer(buf, np.array([0, 5]))


@pytest.mark.parametrize("weighting", ["refill", "soft"])
@pytest.mark.parametrize("dict_obs", [False, True])
def test_train_draws_each_record_as_often_as_its_weight_says(weighting: str, dict_obs: bool) -> None:
    model = _model(dict_obs=dict_obs)
    seen = _spy_train_samples(model)
    cb = _Recording(p=0.5, min_keep=1, seed=3, weighting=weighting)
    model.learn(2 * N_STEPS * N_ENVS, callback=cb)
    assert len(seen) == 2 * model.n_epochs and len(cb.rounds) == 2
    for k, entry in enumerate(cb.filter_history):
        records, scores = cb.rounds[k]
        keep = NegBottom(0.5)(torch.tensor(scores)).keep.tolist()
        assert 0 < keep.count(False) < len(keep)
        weights = [float(x) for x in keep] if weighting == "refill" else _soft_by_hand(scores, keep)
        offset = float(np.random.default_rng([3, k]).random())
        counts = _systematic_by_hand(weights, len(scores), offset)
        expected = Counter(
            {_record_key(i): c for i, c in zip(records.ids.tolist(), counts, strict=True) if c}
        )
        for epoch in range(model.n_epochs):
            drawn = seen[k * model.n_epochs + epoch]
            assert len(drawn) == N_STEPS * N_ENVS  # as many samples, so as many minibatches, as PPO
            assert Counter(drawn) == expected, f"round {k} epoch {epoch}"
        assert entry["n_unique"] == sum(1 for c in counts if c) and entry["max_count"] == max(counts)
        assert entry["weight_sum"] == pytest.approx(sum(weights))
    assert model.rollout_buffer.buffer_size == N_STEPS  # restored at the end of training


def _final_params(**kwargs: Any) -> dict[str, torch.Tensor]:
    model = _model(n_epochs=2)
    model.learn(2 * N_STEPS * N_ENVS, callback=IIFCallback(min_keep=1, **kwargs) if kwargs else None)
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def test_weights_of_one_leave_ppo_bit_identical_and_others_do_not() -> None:
    plain = _final_params()
    for weighting in ("refill", "soft"):
        same = _final_params(p=0.0, weighting=weighting)
        assert all(torch.equal(plain[k], same[k]) for k in plain), weighting
        moved = _final_params(p=0.5, weighting=weighting)
        assert not all(torch.equal(plain[k], moved[k]) for k in plain), weighting
