"""RecordBatch ids and layout; the per-record PPO loss and advantage normalisation by hand."""

from __future__ import annotations

import pytest
import torch

from rlattr.rl.ppo import PPOLossConfig, normalise_advantages, ppo_policy_loss
from rlattr.rl.records import RecordBatch, format_id, index_observations, num_observations
from rlattr.rl.targets import ActionTarget


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
    obs = rec.observations
    assert isinstance(obs, torch.Tensor)
    for pos, (_, step, env) in enumerate(rec.id_list()):
        assert float(obs[pos, 0]) == step * 2 + env
    assert rec.positions([(4, 2, 1), (4, 0, 1)]).tolist() == [5, 1]
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


def _dict_records() -> RecordBatch:
    n_steps, n_envs = 3, 2
    code = torch.arange(n_steps * n_envs, dtype=torch.float32).reshape(n_steps, n_envs)
    z = torch.zeros(n_steps, n_envs)
    obs = {"pos": code[..., None].repeat(1, 1, 2), "img": code[..., None, None].expand(-1, -1, 2, 2).byte()}
    return RecordBatch.from_rollout(
        7,
        observations=obs,
        actions=code[..., None],
        old_log_prob=z,
        values=z,
        rewards=z,
        returns=z,
        advantages=code,
        episode_starts=z,
    )


def test_dict_observations_flatten_step_major_store_and_select() -> None:
    rec = _dict_records()
    obs = rec.observations
    assert rec.has_dict_observations and len(rec) == 6 and isinstance(obs, dict)
    for pos, (_, step, env) in enumerate(rec.id_list()):  # every key flattened like the actions
        assert float(obs["pos"][pos, 1]) == step * 2 + env == float(rec.actions[pos, 0])
        assert int(obs["img"][pos, 1, 1]) == step * 2 + env
    stored = rec.to_tensors()
    assert sorted(k for k in stored if k.startswith("observations")) == [
        "observations/img",
        "observations/pos",
    ]
    back = RecordBatch.from_tensors(stored).observations
    assert isinstance(back, dict) and all(torch.equal(back[k], obs[k]) for k in ("pos", "img"))
    assert back["img"].dtype == torch.uint8
    sub = rec.select(torch.tensor([5, 2]))
    assert sub.id_list() == [(7, 2, 1), (7, 1, 0)]
    assert isinstance(sub.observations, dict) and sub.observations["pos"][:, 0].tolist() == [5.0, 2.0]
    third = index_observations(obs, 3)
    assert isinstance(third, dict) and third["pos"].tolist() == [3.0, 3.0]
    assert num_observations(rec.observations) == 6


def test_dict_observations_with_a_short_key_are_refused() -> None:
    stored = _dict_records().to_tensors()
    stored["observations/img"] = stored["observations/img"][:4]
    with pytest.raises(ValueError, match=r"observations\['img'\]: expected 6 records"):
        RecordBatch.from_tensors(stored)
    with pytest.raises(ValueError, match="same leading"):
        ActionTarget({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, torch.zeros(2))
