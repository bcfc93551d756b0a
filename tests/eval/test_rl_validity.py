"""Local LDS pipeline on a tiny recorded SB3 round: ground truth, scorers, bootstrap, intervention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.core.methods.hessian import ObjectiveHessian
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
from rlattr.rl.replay import max_abs_diff
from tests.rl.test_replay import DISCRETE, recorded

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
            _, logp, _ = ctx.model.evaluate_actions(rec.observations, rec.actions.long().flatten())
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


def test_scorers_are_finite_and_params_restored(ctx: RoundContext) -> None:
    before = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
    for name, fn in SCORERS.items():
        s = fn(ctx)
        assert s.shape == (32,) and torch.isfinite(s).all(), name
    assert max_abs_diff(before, dict(ctx.model.named_parameters())) == 0.0
    # influence with heavy damping is grad-dot up to scale: the rankings agree closely
    g, f = SCORERS["grad_dot"](ctx).numpy(), SCORERS["influence"](ctx).numpy()
    assert np.corrcoef(g, f)[0, 1] > 0.9


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
                _, logp, _ = ctx.model.evaluate_actions(rec.observations[i : i + 1], torch.tensor([c]))
                g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(logp.sum(), leaves)]).double()
                fisher += logp.exp().item() * torch.outer(g, g)
    expected = (fisher / len(rec)) @ v.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
