"""RecordBatch ids and layout; the per-record PPO loss and advantage normalisation by hand."""

from __future__ import annotations

import pytest
import torch

from rlattr.rl.ppo import PPOLossConfig, normalise_advantages, ppo_policy_loss
from rlattr.rl.records import RecordBatch, format_id


def make_records(n_steps: int = 3, n_envs: int = 2, round_index: int = 4) -> RecordBatch:
    base = torch.arange(n_steps * n_envs, dtype=torch.float32).reshape(n_steps, n_envs)
    return RecordBatch.from_rollout(
        round_index,
        observations=torch.stack([base, -base], dim=-1),
        actions=(base % 2).long().unsqueeze(-1),
        old_log_prob=-base / 10,
        values=base / 2,
        rewards=torch.ones(n_steps, n_envs),
        returns=base + 1,
        advantages=base - 2.5,
        episode_starts=torch.zeros(n_steps, n_envs),
    )


def test_ids_are_step_major_and_lead_back_to_the_transition() -> None:
    rec = make_records()
    assert len(rec) == 6 and rec.round_index == 4
    assert rec.id_list() == [(4, s, e) for s in range(3) for e in range(2)]
    for pos, (_, step, env) in enumerate(rec.id_list()):
        assert float(rec.observations[pos, 0]) == step * 2 + env
    pos = rec.positions([(4, 2, 1), (4, 0, 1)])
    assert pos.tolist() == [5, 1]
    assert format_id(rec.ids[5]) == "r4/s2/e1"
    with pytest.raises(KeyError, match=r"\(4, 9, 0\)"):
        rec.positions([(4, 9, 0)])


def test_round_trip_and_select() -> None:
    rec = make_records()
    back = RecordBatch.from_tensors(rec.to_tensors())
    assert all(
        torch.equal(a, b) for a, b in zip(rec.to_tensors().values(), back.to_tensors().values(), strict=True)
    )
    sub = rec.select(torch.tensor([4, 0]))
    assert sub.id_list() == [(4, 2, 0), (4, 0, 0)]


def test_bad_records_name_the_field() -> None:
    rec = make_records().to_tensors()
    rec["advantages"] = rec["advantages"][:3]
    with pytest.raises(ValueError, match="advantages: expected 6 records"):
        RecordBatch.from_tensors(rec)
    with pytest.raises(ValueError, match="ids: expected Tensor"):
        RecordBatch.from_tensors({**make_records().to_tensors(), "ids": torch.zeros(6, 2)})


def test_normalisation_matches_hand_computation() -> None:
    adv = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # buffer: mean 3, unbiased std sqrt(14/3)
    std = (14 / 3) ** 0.5
    torch.testing.assert_close(normalise_advantages(adv, "buffer"), (adv - 3) / (std + 1e-8))
    mb = normalise_advantages(adv, "minibatch", torch.tensor([0, 1, 0, 1]))
    # minibatch {1, 3}: mean 2, std sqrt(2); {2, 6}: mean 4, std sqrt(8)
    expected = torch.tensor([-1 / 2**0.5, -2 / 8**0.5, 1 / 2**0.5, 2 / 8**0.5])
    torch.testing.assert_close(mb, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalise_advantages(adv, "none"), adv)
    # a minibatch of one record is left as is (SB3, GH issue #325)
    assert float(normalise_advantages(adv, "minibatch", torch.tensor([0, 0, 0, 1]))[3]) == 6.0
    with pytest.raises(ValueError, match="minibatch_of"):
        normalise_advantages(adv, "minibatch")
    with pytest.raises(ValueError, match="mode: got 'batch'"):
        normalise_advantages(adv, "batch")


def test_clipped_surrogate_by_hand() -> None:
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    # ratios 1, 1.5, 0.5, 1.5 with clip 0.2 -> min(A r, A clip(r)) = 2, 1.2, -0.8, -1.5
    torch.testing.assert_close(ppo_policy_loss(logp, old, adv, 0.2), -torch.tensor([2.0, 1.2, -0.8, -1.5]))


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="advantage_norm"):
        PPOLossConfig(advantage_norm="global")
    with pytest.raises(ValueError, match="clip_range"):
        PPOLossConfig(clip_range=0.0)
