"""Local LDS pipeline on a tiny recorded SB3 round: ground truth, scorers, bootstrap, intervention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import spearmanr
from stable_baselines3.common.policies import ActorCriticPolicy

from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.core.methods.hessian import ObjectiveHessian
from rlattr.errors import RlattrError
from rlattr.eval.groundtruth import subset_masks
from rlattr.eval.rl_validity import (
    SCORERS,
    RoundContext,
    action_log_probs,
    fisher_output_loss,
    intervention_thetas,
    lds_with_ci,
    local_ground_truth,
    local_lds,
    params_loaded,
    retrain_subset,
)
from rlattr.rl.attribution import build_round_task
from rlattr.rl.filtering import NegBottom
from rlattr.rl.records import index_observations
from rlattr.rl.replay import max_abs_diff, replay_round, seeded_permutations
from tests.rl.test_replay import DISCRETE, brute_force_tracin, recorded

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ctx() -> RoundContext:
    model, recorder = recorded(DISCRETE, rounds=2, learning_rate=3e-3)
    policy = model.policy
    return RoundContext(
        policy,
        SB3PolicyEval(policy, with_values=True),
        SB3PolicyEval(policy),
        tracked_param_names(policy),
        recorder.snapshots[1],
        n_actions=3,
    )


def policy_of(ctx: RoundContext) -> ActorCriticPolicy:
    assert isinstance(ctx.model, ActorCriticPolicy)
    return ctx.model


def test_lds_with_ci_hand_checked() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    targets = torch.tensor([0.1, 0.4, 0.3, 0.2])
    # predictions 3, 7, 4, 6 -> ranks 1, 4, 2, 3; targets ranks 1, 4, 3, 2: 1 - 6 * 2 / (4 * 15) = 0.8
    out = lds_with_ci(scores, masks, targets, n_boot=200, seed=0)
    assert out["lds"] == pytest.approx(0.8)
    assert -1.0 <= out["lo"] <= out["hi"] <= 1.0
    assert lds_with_ci(scores, masks, targets, n_boot=200, seed=0) == out


def test_ground_truth_matches_direct_retraining_and_is_seeded(ctx: RoundContext) -> None:
    masks, values = local_ground_truth(ctx, 4, fraction=0.5, seed=7)
    assert values.shape == (4, 1)
    targets = values[:, 0]
    assert torch.equal(masks, subset_masks(len(ctx.snapshot.records), 4, 0.5, 7))
    assert masks.sum(1).tolist() == [16] * 4
    rec = ctx.snapshot.records
    for s in (0, 3):
        theta = retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, masks[s], 7 + s)
        with params_loaded(ctx.model, theta), torch.no_grad():
            _, logp, _ = policy_of(ctx).evaluate_actions(rec.observations, rec.actions.long().flatten())
        assert float(targets[s]) == pytest.approx(float((logp * rec.advantages).mean()), abs=1e-6)
    again_masks, again = local_ground_truth(ctx, 4, fraction=0.5, seed=7)
    assert torch.equal(again_masks, masks) and torch.equal(again, values)
    assert not torch.equal(local_ground_truth(ctx, 4, fraction=0.5, seed=8)[0], masks)


def test_local_lds_equals_scipy_spearman(ctx: RoundContext) -> None:
    masks, values = local_ground_truth(ctx, 8, seed=1)
    targets = values[:, 0]
    scores = {k: SCORERS[k](ctx) for k in ("grad_dot", "tracin")}
    out = local_lds(ctx, scores, masks, targets, n_boot=100)
    for k, v in scores.items():
        expected = spearmanr((masks.double() @ v).numpy(), targets.numpy()).statistic
        assert out[k]["lds"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="scores: expected Tensor"):
        local_lds(ctx, {"bad": torch.zeros(3)}, masks, targets)


class _Wrapped(torch.nn.Module):
    """``evaluate_actions`` as ``forward``, so torch.func can call it with given parameters."""

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, obs: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.policy.evaluate_actions(obs, actions)


def actor_oracle(ctx: RoundContext, names: list[str]) -> dict[str, torch.Tensor]:
    """At theta(k), by plain autograd through SB3's ``evaluate_actions`` over the flat actor
    parameters (``names`` order): per-record PPO-loss gradients ``G [n, d]`` (buffer-normalised
    advantages), the return target's gradient ``g_f [d]`` and the Hessian ``H [d, d]`` of the
    mean loss."""
    wrapped = _Wrapped(policy_of(ctx))  # its parameters are replaced by theta(k) in every call
    theta = ctx.snapshot.theta
    fixed = {f"policy.{k}": theta.get(k, v).detach() for k, v in ctx.model.named_parameters()}
    sizes = [fixed[f"policy.{n}"].numel() for n in names]
    flat0 = torch.cat([fixed[f"policy.{n}"].reshape(-1) for n in names])
    rec, config = ctx.snapshot.records, ctx.score_config()
    acts = rec.actions.long().flatten()
    adv = (rec.advantages - rec.advantages.mean()) / (rec.advantages.std() + 1e-8)

    def evaluate(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        parts = dict(zip(names, flat.split(sizes), strict=True))
        params = {**fixed, **{f"policy.{n}": parts[n].view_as(fixed[f"policy.{n}"]) for n in names}}
        return torch.func.functional_call(wrapped, params, (rec.observations, acts))

    def losses(flat: torch.Tensor) -> torch.Tensor:
        _, logp, entropy = evaluate(flat)
        assert entropy is not None  # a Categorical policy has one
        ratio = torch.exp(logp - rec.old_log_prob)
        c = config.clip_range
        return -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - c, 1 + c)) - config.ent_coef * entropy

    def target(flat: torch.Tensor) -> torch.Tensor:
        return (evaluate(flat)[1] * rec.advantages).mean()

    jac = torch.autograd.functional.jacobian
    return {
        "G": jac(losses, flat0).double(),
        "g_f": jac(target, flat0).double(),
        "H": torch.autograd.functional.hessian(lambda f: losses(f).mean(), flat0).double(),
    }


def test_scorers_equal_autograd_oracles_and_restore_params(ctx: RoundContext) -> None:
    before = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
    with params_loaded(ctx.model, ctx.snapshot.theta):
        names = build_round_task(ctx.round_spec())[0].tracked_names
    oracle = actor_oracle(ctx, names)
    G, g_f, H = oracle["G"], oracle["g_f"], oracle["H"]
    scores = {name: fn(ctx) for name, fn in SCORERS.items()}
    for name, s in scores.items():
        assert s.shape == (32,) and torch.isfinite(s).all(), name
    assert max_abs_diff(before, dict(ctx.model.named_parameters())) == 0.0
    # grad-dot: <grad f, -grad L_i>
    expected = -(G @ g_f)
    torch.testing.assert_close(
        scores["grad_dot"], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
    )
    # influence: -grad f^T (H + lambda I)^-1 grad L_i, lambda = 2 max|eig H| (H is indefinite)
    radius = float(torch.linalg.eigvalsh(H).abs().max())
    damped = H + 2.0 * radius * torch.eye(H.shape[0], dtype=H.dtype)
    expected = -(G @ torch.linalg.solve(damped, g_f))
    scale = float(expected.abs().max())
    # the scorer's lambda comes from 40 power iterations, not an exact eigensolver
    torch.testing.assert_close(scores["influence"], expected, rtol=2e-3, atol=2e-3 * scale)
    # TracIn over the round's update steps: the plain-autograd replay of tests/rl/test_replay.py
    expected = brute_force_tracin(ctx.snapshot)
    torch.testing.assert_close(scores["tracin"], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_intervention_drops_the_neg_bottom_records(ctx: RoundContext) -> None:
    scores = SCORERS["grad_dot"](ctx)
    out = intervention_thetas(ctx, scores, p=0.5, n_random=2, seed=3)
    assert out["n_dropped"] == NegBottom(0.5)(scores.float()).n_dropped > 0
    keep_all = torch.ones(32, dtype=torch.bool)
    full = retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, keep_all, 3)
    assert max_abs_diff(out["full"], full) == 0.0
    assert len(out["random"]) == 2 and max_abs_diff(out["random"][0], out["random"][1]) > 0


def test_fisher_curvature_is_the_policy_fisher(ctx: RoundContext) -> None:
    """The Gauss-Newton operator of influence_fisher equals mean_i sum_c p_ic g_ic g_ic^T, with
    g_ic = grad log pi(c|s_i) by plain autograd through the policy module."""
    rec = ctx.snapshot.records
    with params_loaded(ctx.model, ctx.snapshot.theta):
        task, train, _ = build_round_task(ctx.round_spec())
        output = action_log_probs(ctx.actor_eval, 3)
        train["action_probs"] = output(task.tracked_params(), train).exp().detach()
        hessian = ObjectiveHessian(task, train, output=output, output_loss=fisher_output_loss)
        v = torch.randn(hessian.dim, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        got = hessian.matvec(v)
        named = dict(ctx.model.named_parameters())
        leaves = [named[n] for n in task.tracked_names]
        fisher = torch.zeros(hessian.dim, hessian.dim, dtype=torch.float64)
        for i in range(len(rec)):
            for c in range(3):
                obs_i = index_observations(rec.observations, slice(i, i + 1))
                _, logp, _ = policy_of(ctx).evaluate_actions(obs_i, torch.tensor([c]))
                g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(logp.sum(), leaves)]).double()
                fisher += logp.exp().item() * torch.outer(g, g)
    expected = (fisher / len(rec)) @ v.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_retrain_subset_on_all_records_is_a_replay_with_seeded_order() -> None:
    model, recorder = recorded(DISCRETE, rounds=1)
    snap, evaluator = recorder.snapshots[0], SB3PolicyEval(model.policy, with_values=True)
    n = len(snap.records)
    theta = retrain_subset(model.policy, evaluator, snap, torch.ones(n, dtype=torch.bool), seed=4)
    seeded = replace(snap, permutations=seeded_permutations(n, snap.hyper.n_epochs, 4))
    assert max_abs_diff(theta, replay_round(model.policy, evaluator, seeded).theta) == 0.0
    with pytest.raises(
        RlattrError, match=rf"^keep: expected a bool Tensor\[{n}\], got torch.float32 \({n},\)$"
    ):
        retrain_subset(model.policy, evaluator, snap, torch.ones(n), seed=0)
