"""Learned weights on a PPO round of a tiny CNN policy on an image env (no MiniGrid needed):
the parts target, epoch checkpoints, per-group scores against autograd for-loops, the LDS report."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecTransposeImage

from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.callbacks.sb3.replay import RoundRecorder
from rlattr.errors import RlattrError
from rlattr.eval.groundtruth import subset_masks
from rlattr.eval.metrics import lds
from rlattr.eval.rl_validity import RoundContext, local_ground_truth, params_loaded
from rlattr.eval.rl_weights import (
    WeightedRound,
    epoch_checkpoints,
    learned_weights_round,
    parts_return_target,
)
from rlattr.rl.ppo import normalise_advantages
from rlattr.rl.replay import max_abs_diff, replay_round
from tests.callbacks.sb3.envs import SMALL_NET, TinyCNN, ToyEnv

DISCRETE = spaces.Discrete(3)


@pytest.fixture(scope="module")
def ctx() -> RoundContext:
    def make() -> ToyEnv:
        return ToyEnv(DISCRETE, obs="image")

    model = PPO(
        "CnnPolicy", DummyVecEnv([make] * 2), n_steps=16, batch_size=10, n_epochs=3, seed=0, device="cpu",
        learning_rate=3e-3, policy_kwargs={"features_extractor_class": TinyCNN, **SMALL_NET},
    )  # fmt: skip
    validation = VecTransposeImage(DummyVecEnv([make]))
    validation.seed(5)
    recorder = RoundRecorder([1], validation_env=validation, validation_steps=24)
    model.learn(2 * 16 * 2, callback=recorder)
    snap = recorder.snapshots[1]
    assert snap.validation is not None
    parts = [
        snap.records,
        snap.validation.select(torch.arange(12)),
        snap.validation.select(torch.arange(12, 24)),
    ]
    policy = model.policy
    return RoundContext(
        policy, SB3PolicyEval(policy, with_values=True), SB3PolicyEval(policy), tracked_param_names(policy),
        snap, target=parts_return_target(parts),
    )  # fmt: skip


def log_probs(ctx: RoundContext, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    policy = ctx.model
    _, logp, _ = policy.evaluate_actions(obs, actions.long().flatten())  # type: ignore[operator]
    return logp


def test_parts_target_is_each_parts_mean_surrogate(ctx: RoundContext) -> None:
    snap = ctx.snapshot
    assert snap.validation is not None
    values = ctx.target_value(snap.theta)
    assert values.shape == (3,)
    parts = [
        snap.records,
        snap.validation.select(torch.arange(12)),
        snap.validation.select(torch.arange(12, 24)),
    ]
    with params_loaded(ctx.model, snap.theta), torch.no_grad():
        for j, part in enumerate(parts):
            obs = part.observations
            assert isinstance(obs, torch.Tensor)
            terms = [
                float(log_probs(ctx, obs[t : t + 1], part.actions[t : t + 1])[0]) * float(a)
                for t, a in enumerate(part.advantages)
            ]
            assert float(values[j]) == pytest.approx(sum(terms) / len(part), rel=1e-5, abs=1e-7)


def test_epoch_checkpoints_start_at_theta_k_and_follow_the_replay(ctx: RoundContext) -> None:
    every1, every2 = epoch_checkpoints(ctx, 1), epoch_checkpoints(ctx, 2)
    assert len(every1) == 3 and len(every2) == 2
    assert all(torch.equal(every1[0][k], ctx.snapshot.theta[k]) for k in ctx.actor_params)
    assert max_abs_diff(every2[1], every1[2]) == 0.0
    assert max_abs_diff(every1[1], every1[0]) > 1e-6  # one epoch moved the actor
    full = replay_round(ctx.model, ctx.policy_eval, ctx.snapshot).theta
    assert ctx.snapshot.theta_next is not None and max_abs_diff(full, ctx.snapshot.theta_next) <= 1e-6
    with pytest.raises(RlattrError, match=r"every: got 4; supported: an integer in \[1, 3\]"):
        epoch_checkpoints(ctx, 4)


def brute_force(ctx: RoundContext, checkpoints: list[dict[str, torch.Tensor]], lr: float) -> torch.Tensor:
    """``Tensor[m, n]``: sum over checkpoints of lr <grad f_j, grad min(A~_i r_i, A~_i clip(r_i))> by
    autograd, one record at a time (r_i the probability ratio to the collecting policy)."""
    rec = ctx.snapshot.records
    assert ctx.target is not None
    batch = ctx.target.build(ctx.actor_eval, rec, ctx.snapshot.validation)[1]
    norm = normalise_advantages(rec.advantages, "buffer")
    clip = ctx.snapshot.hyper.clip_range
    named = dict(ctx.model.named_parameters())
    params = [named[k] for k in ctx.actor_params]
    total = torch.zeros(3, len(rec), dtype=torch.float64)
    for ckpt in checkpoints:
        with params_loaded(ctx.model, ckpt):
            logp = log_probs(ctx, batch["observations"], batch["actions"])
            f = batch["mean_of_part"].float() @ (logp * batch["advantages"])
            g_f = [
                torch.cat([g.flatten() for g in torch.autograd.grad(f[j], params, retain_graph=True)])
                for j in range(3)
            ]
            obs = rec.observations
            assert isinstance(obs, torch.Tensor)
            for i in range(len(rec)):
                lp = log_probs(ctx, obs[i : i + 1], rec.actions[i : i + 1])[0]
                r = torch.exp(lp - rec.old_log_prob[i])
                surrogate = torch.min(norm[i] * r, norm[i] * torch.clamp(r, 1 - clip, 1 + clip))
                g_i = torch.cat([g.flatten() for g in torch.autograd.grad(surrogate, params)])
                for j in range(3):
                    total[j, i] += lr * float(g_f[j].double() @ g_i.double())
    return total


@pytest.mark.parametrize("base", ["grad_dot", "tracin"])
def test_group_parts_sum_to_a_for_loop_score(ctx: RoundContext, base: str) -> None:
    assert ctx.snapshot.validation is not None
    fit = parts_return_target([ctx.snapshot.validation]).batch
    assert fit is not None
    wr = learned_weights_round(ctx, base, fit, steps=50, normalize=(False, True))
    n = len(ctx.snapshot.records)
    assert wr.contrib.shape == (3, n, len(ctx.actor_params))  # one group per tensor
    assert wr.group_names == ctx.actor_params
    if base == "grad_dot":
        expected = brute_force(ctx, [ctx.snapshot.theta], 1.0)
    else:
        expected = brute_force(ctx, epoch_checkpoints(ctx), ctx.snapshot.hyper.learning_rate)
    scale = float(expected.abs().max())
    assert float((wr.base_scores() - expected).abs().max()) <= 1e-4 * scale
    w = wr.weights["learned_weights"]
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w.std()) > 1e-4  # the fit moved them
    hand = torch.stack([w[g] * wr.contrib[..., g] for g in range(wr.contrib.shape[-1])]).sum(0)
    assert torch.allclose(wr.weighted_scores(), hand)
    assert set(wr.weights) == {"learned_weights", "learned_weights_normalized"}
    norms = [float(wr.contrib[..., g].norm()) for g in range(wr.contrib.shape[-1])]
    assert list(wr.group_share().values()) == pytest.approx([x / sum(norms) for x in norms])


def test_lds_report_against_direct_lds(ctx: RoundContext) -> None:
    masks, values = local_ground_truth(ctx, 6, fraction=0.5, seed=3)
    assert values.shape == (6, 3) and torch.equal(masks, subset_masks(len(ctx.snapshot.records), 6, 0.5, 3))
    gen = torch.Generator().manual_seed(0)
    contrib = torch.randn(3, len(ctx.snapshot.records), 2, generator=gen, dtype=torch.float64)
    wr = WeightedRound(
        contrib, {"learned_weights": torch.tensor([1.5, 0.5], dtype=torch.float64)}, ["a", "b"]
    )
    report = wr.lds_report(masks, values)
    assert report["lds"] == pytest.approx(
        float(lds(contrib[..., 0] + contrib[..., 1], masks.double(), values))
    )
    weighted = 1.5 * contrib[..., 0] + 0.5 * contrib[..., 1]
    assert report["lds_learned_weights"] == pytest.approx(float(lds(weighted, masks.double(), values)))
    assert report["group_lds"] == {
        "a": pytest.approx(float(lds(contrib[..., 0], masks.double(), values))),
        "b": pytest.approx(float(lds(contrib[..., 1], masks.double(), values))),
    }
    assert report["weights_learned_weights"] == {"a": 1.5, "b": 0.5}
    with pytest.raises(RlattrError, match=r"variant: got 'x'; supported: \['learned_weights'\]"):
        wr.weighted_scores("x")


def test_argument_errors(ctx: RoundContext) -> None:
    with pytest.raises(RlattrError, match=r"base: got 'trak'; supported: \['grad_dot', 'tracin'\]"):
        learned_weights_round(ctx, "trak", {})
    with pytest.raises(RlattrError, match=r"normalize: got \[True, True\]; supported: distinct booleans"):
        learned_weights_round(ctx, "grad_dot", {}, normalize=(True, True))
    with pytest.raises(RlattrError, match="parts: expected a non-empty list of RecordBatch"):
        parts_return_target([])
    dict_obs = replace(ctx.snapshot.records, observations={"x": torch.zeros(len(ctx.snapshot.records), 2)})
    with pytest.raises(RlattrError, match="parts: got dict observations; supported: tensor observations"):
        parts_return_target([dict_obs])
