"""Exact replay of SB3 PPO rounds (RoundRecorder + replay_round) and TracIn over the round's steps."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.vec_env import DummyVecEnv

from rlattr.callbacks.sb3.iif import IIFCallback
from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.callbacks.sb3.replay import RoundRecorder, sb3_permutations
from rlattr.rl.replay import RoundSnapshot, max_abs_diff, replay_round, seeded_permutations
from rlattr.rl.targets import ReturnTarget
from tests.callbacks.sb3.envs import SMALL_NET, ToyEnv

torch.set_num_threads(1)
DISCRETE = spaces.Discrete(3)
BOX = spaces.Box(-1.0, 1.0, (2,), np.float32)


def tiny_ppo(space: spaces.Space, obs: str = "vector", **kwargs) -> PPO:
    env = DummyVecEnv([lambda: ToyEnv(space, obs=obs)] * 2)
    settings: dict[str, Any] = dict(
        n_steps=16, batch_size=10, n_epochs=3, seed=0, device="cpu", policy_kwargs=SMALL_NET
    )
    settings.update(kwargs)
    return PPO("MultiInputPolicy" if obs == "dict" else "MlpPolicy", env, **settings)


def recorded(space: spaces.Space, rounds: int = 2, **kwargs) -> tuple[PPO, RoundRecorder]:
    model = tiny_ppo(space, **kwargs)
    recorder = RoundRecorder()
    model.learn(rounds * model.n_steps * model.n_envs, callback=recorder)
    return model, recorder


@pytest.mark.parametrize(
    "space, kwargs",
    [
        (DISCRETE, {"ent_coef": 0.01, "clip_range_vf": 0.3}),
        (BOX, {"learning_rate": lambda progress: 1e-3 * (0.5 + progress)}),
        (BOX, {"target_kl": 1e-4, "learning_rate": 3e-3}),
        (DISCRETE, {"obs": "dict", "ent_coef": 0.01}),
    ],
    ids=["discrete-adam-entropy-vfclip", "box-lr-schedule", "box-target-kl", "dict-obs"],
)
def test_replay_reproduces_sb3_theta_next(space: spaces.Space, kwargs: dict) -> None:
    model, recorder = recorded(space, **kwargs)
    assert sorted(recorder.snapshots) == [0, 1]
    evaluator = SB3PolicyEval(model.policy, with_values=True)
    for snap in recorder.snapshots.values():
        assert snap.meta["rng_verified"]
        assert snap.theta_next is not None and max_abs_diff(snap.theta, snap.theta_next) > 1e-5
        result = replay_round(model.policy, evaluator, snap)
        assert snap.theta_next is not None and max_abs_diff(result.theta, snap.theta_next) <= 1e-6
    if "target_kl" in kwargs:
        assert result.stopped_early and result.n_updates < 3 * 4
        assert snap.meta["epochs_drawn"] == (result.n_updates // 4) + 1
    else:
        assert result.n_updates == 3 * 4  # 3 epochs of ceil(32 / 10) minibatches


def test_recorder_leaves_training_unchanged_and_collects_validation() -> None:
    plain = tiny_ppo(DISCRETE)
    plain.learn(64)
    model = tiny_ppo(DISCRETE)
    validation_env = DummyVecEnv([lambda: ToyEnv(DISCRETE)])
    validation_env.seed(1)
    recorder = RoundRecorder(validation_env=validation_env, validation_steps=12)
    model.learn(64, callback=recorder)
    assert max_abs_diff(dict(plain.policy.named_parameters()), dict(model.policy.named_parameters())) == 0.0
    snap = recorder.snapshots[1]
    assert snap.validation is not None and len(snap.validation) == 12 and snap.meta["rng_verified"]
    result = replay_round(
        model.policy,
        SB3PolicyEval(model.policy, with_values=True),
        snap,
        tracin_target=ReturnTarget(source="validation"),
        actor_eval=SB3PolicyEval(model.policy),
    )
    assert result.tracin is not None and torch.isfinite(result.tracin).all()
    assert snap.theta_next is not None and max_abs_diff(result.theta, snap.theta_next) <= 1e-6


def test_sb3_permutations_map_env_major_to_step_major() -> None:
    state = np.random.RandomState(3).get_state(legacy=False)
    perm = sb3_permutations(state, n_steps=3, n_envs=2, n_epochs=1)[0]
    flat = np.random.RandomState(3).permutation(6)  # env-major: f = env * 3 + step
    expected = [(f % 3) * 2 + f // 3 for f in flat]
    assert perm.tolist() == expected


def test_seeded_permutations_and_snapshot_validation() -> None:
    a, b = seeded_permutations(7, 2, seed=5), seeded_permutations(7, 2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], seeded_permutations(7, 2, seed=6)[0])
    _, recorder = recorded(DISCRETE, rounds=1)
    snap = recorder.snapshots[0]
    with pytest.raises(ValueError, match="permutations: entry 0"):
        replace(snap, permutations=[torch.zeros(len(snap.records), dtype=torch.int64)])


def brute_force_tracin(snap: RoundSnapshot) -> torch.Tensor:
    """TracIn over steps by plain autograd on a fresh policy module, one record at a time."""
    policy = tiny_ppo(DISCRETE).policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(snap.theta[name])
    assert snap.optimizer_class is torch.optim.Adam  # SB3's default
    optimizer = torch.optim.Adam(policy.parameters(), lr=snap.hyper.learning_rate)
    optimizer.load_state_dict(copy.deepcopy(snap.optimizer_state))
    actor = [p for n, p in policy.named_parameters() if n in tracked_param_names(policy)]
    rec, h = snap.records, snap.hyper
    assert isinstance(rec.observations, torch.Tensor)
    scores = torch.zeros(len(rec), dtype=torch.float64)
    for perm in snap.permutations:
        for start in range(0, len(rec), h.batch_size):
            idx = perm[start : start + h.batch_size]
            adv = rec.advantages[idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            _, logp_all, _ = policy.evaluate_actions(rec.observations, rec.actions.long().flatten())
            f = (logp_all * rec.advantages).mean()
            grad_f = torch.autograd.grad(f, actor)
            for j, i in enumerate(idx.tolist()):
                _, logp, _ = policy.evaluate_actions(
                    rec.observations[i : i + 1], rec.actions[i : i + 1].long().flatten()
                )
                ratio = torch.exp(logp - rec.old_log_prob[i])
                loss_i = -torch.min(
                    adv[j] * ratio, adv[j] * torch.clamp(ratio, 1 - h.clip_range, 1 + h.clip_range)
                )
                g_i = torch.autograd.grad(loss_i.sum(), actor)
                scores[i] += sum(float((a * -b).sum()) for a, b in zip(grad_f, g_i, strict=True))
            values, logp, entropy = policy.evaluate_actions(
                rec.observations[idx], rec.actions[idx].long().flatten()
            )
            ratio = torch.exp(logp - rec.old_log_prob[idx])
            pg = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - h.clip_range, 1 + h.clip_range)).mean()
            loss = pg + h.vf_coef * F.mse_loss(rec.returns[idx], values.flatten())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), h.max_grad_norm)
            optimizer.step()
    return scores


def test_tracin_over_steps_equals_brute_force_sum() -> None:
    model, recorder = recorded(DISCRETE, rounds=2, learning_rate=3e-3)
    snap = recorder.snapshots[1]
    result = replay_round(
        model.policy,
        SB3PolicyEval(model.policy, with_values=True),
        snap,
        tracin_target=ReturnTarget(),
        actor_eval=SB3PolicyEval(model.policy),
        actor_params=tracked_param_names(model.policy),
    )
    expected = brute_force_tracin(snap)
    assert result.tracin is not None and result.tracin.shape == (32,)
    torch.testing.assert_close(result.tracin, expected, rtol=1e-4, atol=1e-6)
    assert snap.theta_next is not None and max_abs_diff(result.theta, snap.theta_next) <= 1e-6


def test_replay_after_iif_compaction() -> None:
    """Placed after IIFCallback, the recorder sees the compacted buffer train() runs on."""
    model = tiny_ppo(DISCRETE)
    iif = IIFCallback(drop="neg-bottom", p=0.5, min_keep=4, tensorboard=False)
    recorder = RoundRecorder()
    model.learn(64, callback=CallbackList([iif, recorder]))
    evaluator = SB3PolicyEval(model.policy, with_values=True)
    for k, snap in recorder.snapshots.items():
        assert len(snap.records) == iif.filter_history[k]["n_kept"] < 32
        assert snap.theta_next is not None
        assert max_abs_diff(replay_round(model.policy, evaluator, snap).theta, snap.theta_next) <= 1e-6
