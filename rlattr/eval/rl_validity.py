"""Counterfactual validation of one PPO round's attribution scores: local LDS and intervention.

**Local ground truth.** From theta(k), the round's update is re-run (:func:`rlattr.rl.replay.
retrain_subset`, same hyperparameters, seeded minibatch order) on M random subsets S_s of the
buffer (:func:`rlattr.eval.groundtruth.subset_masks`, e.g. 50% each), and the target is measured at
each resulting policy: ``f_s = f(theta_S_s)``. The **local LDS** of a scorer tau is the Spearman
correlation over s of ``sum_{i in S_s} tau_i`` and ``f_s`` (:func:`rlattr.eval.metrics.lds`), with
a bootstrap confidence interval over the subsets.

**Scorers** (:data:`SCORERS`, each ``(ctx) -> Tensor[n]``, positive = helps the target):

* ``grad_dot``: the single-checkpoint score IIF uses, ``<grad f(theta(k)), -grad L_i(theta(k))>``
  with buffer-normalised advantages (:func:`rlattr.rl.attribution.score_round`).
* ``tracin``: TracIn over the round's update steps, from the exact replay.
* ``influence``: ``-grad f^T (H + lambda I)^-1 grad L_i`` at theta(k) by conjugate gradient
  (:class:`rlattr.core.methods.InfluenceFunction`), H the Hessian of the mean per-record actor
  loss; it is indefinite, so lambda = ``damping_ratio`` x its largest absolute eigenvalue.
* ``learned_weights``: grad-dot with per-layer weights learned by the label-free top-k objective
  (:class:`rlattr.core.methods.LearnedWeights`).

**Intervention test** (the paper's evidence): drop the bottom records (IIF's neg-bottom rule on a
scorer) or as many random records, retrain the round from theta(k), and compare the resulting
policies (:func:`intervention_thetas`; the caller measures their evaluation return).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlattr.core.methods import GradDot, InfluenceFunction, LearnedWeights
from rlattr.core.methods.hessian import ObjectiveHessian
from rlattr.core.task import Batch, Params
from rlattr.errors import RlattrError
from rlattr.eval.groundtruth import subset_masks, subset_retraining
from rlattr.eval.metrics import lds, spearman
from rlattr.rl.attribution import RoundSpec, build_round_task, score_round
from rlattr.rl.filtering import make_rule
from rlattr.rl.ppo import PolicyEval, PPOLossConfig
from rlattr.rl.records import num_observations
from rlattr.rl.replay import RoundSnapshot, replay_round, seeded_permutations
from rlattr.rl.targets import ReturnTarget, TargetSpec


@dataclass
class RoundContext:
    """One recorded round and how to evaluate its policy.

    Args:
        model: the policy module (its parameters are swapped temporarily, then put back).
        policy_eval: evaluator *with values* (the update's loss), keyed by the module's names.
        actor_eval: evaluator for log-probs only (the scores' per-record loss and the target).
        actor_params: the names of the scored (actor) parameters.
        snapshot: the round (:class:`~rlattr.rl.replay.RoundSnapshot`).
        target: what is attributed (default: the return target on the round's buffer).
        n_actions: the number of actions of a Discrete action space (enables ``influence_fisher``).
    """

    model: nn.Module
    policy_eval: PolicyEval
    actor_eval: PolicyEval
    actor_params: list[str]
    snapshot: RoundSnapshot
    target: TargetSpec | None = None
    n_actions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.snapshot, RoundSnapshot):
            raise TypeError(f"snapshot: expected a RoundSnapshot, got {type(self.snapshot).__name__}")
        unknown = [n for n in self.actor_params if n not in self.snapshot.theta]
        if not self.actor_params or unknown:
            raise RlattrError(f"actor_params: expected names of snapshot.theta, unknown: {unknown}")
        if self.target is None:
            self.target = ReturnTarget()

    def score_config(self) -> PPOLossConfig:
        """The single-checkpoint loss settings (buffer-normalised advantages, as IIF scores)."""
        config = self.snapshot.hyper.loss_config()
        return replace(config, advantage_norm="buffer" if config.advantage_norm != "none" else "none")

    def round_spec(self) -> RoundSpec:
        """The round's attribution problem at the module's current parameters (load theta(k) first)."""
        assert self.target is not None
        return RoundSpec(
            self.model,
            self.actor_eval,
            self.snapshot.records,
            self.target,
            self.score_config(),
            params=self.actor_params,
            validation=self.snapshot.validation,
        )

    def target_value(self, theta: dict[str, Tensor]) -> Tensor:
        """The target at a policy: ``Tensor[1]`` (``Tensor[m]`` for a target of m components)."""
        assert self.target is not None
        fn, batch = self.target.build(self.actor_eval, self.snapshot.records, self.snapshot.validation)
        with torch.no_grad():
            return fn({k: theta[k] for k in self.actor_params}, batch).reshape(-1).detach().double()


@contextmanager
def params_loaded(model: nn.Module, theta: dict[str, Tensor]) -> Iterator[None]:
    """Copy ``theta`` into the module's parameters for the block, then put the old values back."""
    named = dict(model.named_parameters())
    saved = {k: named[k].detach().clone() for k in theta if k in named}
    try:
        with torch.no_grad():
            for k, v in theta.items():
                if k in named:
                    named[k].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                named[k].copy_(v)


def score_grad_dot(ctx: RoundContext) -> Tensor:
    """IIF's single-checkpoint score at theta(k): ``Tensor[n]``."""
    with params_loaded(ctx.model, ctx.snapshot.theta):
        result = score_round(ctx.round_spec())
    return result.scores.double()


def score_tracin(ctx: RoundContext) -> Tensor:
    """TracIn over the round's update steps (exact replay of the recorded round): ``Tensor[n]``."""
    result = replay_round(
        ctx.model,
        ctx.policy_eval,
        ctx.snapshot,
        tracin_target=ctx.target,
        actor_eval=ctx.actor_eval,
        actor_params=ctx.actor_params,
    )
    assert result.tracin is not None
    return result.tracin


def spectral_radius(hessian: ObjectiveHessian, iters: int = 40, seed: int = 0) -> float:
    """``max |eig H|`` by power iteration on the norm ``||H v||`` (sign-blind, unlike a Rayleigh
    quotient, which stalls near 0 when the largest positive and negative eigenvalues are close)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(hessian.dim, 1, generator=gen, dtype=hessian.theta.dtype)
    radius = 0.0
    for _ in range(iters):
        w = hessian.matvec(v / v.norm())
        radius, v = float(w.norm()), w
    return radius


def score_influence(ctx: RoundContext, damping_ratio: float = 2.0, max_iter: int = 100) -> Tensor:
    """Influence function at theta(k) by CG, damping = ``damping_ratio`` x max |eig H|: ``Tensor[n]``."""
    if not damping_ratio > 1.0:
        raise RlattrError(f"damping_ratio: must exceed 1 (H is indefinite), got {damping_ratio!r}")
    with params_loaded(ctx.model, ctx.snapshot.theta):
        task, train, query = build_round_task(ctx.round_spec())
        scale = spectral_radius(ObjectiveHessian(task, train, chunk_size=4096))
        attributor = InfluenceFunction(
            task, strategy="cg", damping=damping_ratio * scale, chunk_size=512, max_iter=max_iter, tol=1e-6
        )
        attributor.cache(train)
        return attributor.attribute(query)[0].double()


def action_log_probs(actor_eval: PolicyEval, n_actions: int) -> Callable[[Params, Batch], Tensor]:
    """``(params, batch) -> Tensor[n, n_actions]``: log pi(c|s) of every action c of a Discrete space."""

    def output(params: Params, batch: Batch) -> Tensor:
        obs = batch["observations"]
        cols = [
            actor_eval(params, obs, torch.full((num_observations(obs), 1), float(c))).log_prob
            for c in range(n_actions)
        ]
        return torch.stack(cols, dim=1)

    return output


def fisher_output_loss(z: Tensor, batch: Batch) -> Tensor:
    """``0.5 sum_c p_c z_c^2`` per record (p = ``batch["action_probs"]`` at theta(k)): its Hessian in
    z = log pi is diag(p), so the Gauss-Newton matrix over z is the policy's Fisher information."""
    return 0.5 * (batch["action_probs"].to(z.dtype) * z * z).sum(1)


def score_influence_fisher(ctx: RoundContext, damping_ratio: float = 0.1, max_iter: int = 100) -> Tensor:
    """Influence with the policy's Fisher ``E_s sum_a pi(a|s) g_a g_a^T`` as curvature (the PPO
    trust region's metric; positive definite with damping = ``damping_ratio`` x its top
    eigenvalue), by CG: ``Tensor[n]``. Discrete action spaces only (``ctx.n_actions``)."""
    if ctx.n_actions is None or ctx.n_actions < 2:
        raise RlattrError(
            f"ctx.n_actions: influence_fisher needs a Discrete action count >= 2, got {ctx.n_actions}"
        )
    if not damping_ratio > 0:
        raise RlattrError(f"damping_ratio: must be > 0, got {damping_ratio!r}")
    output = action_log_probs(ctx.actor_eval, ctx.n_actions)
    with params_loaded(ctx.model, ctx.snapshot.theta):
        task, train, query = build_round_task(ctx.round_spec())
        with torch.no_grad():
            train["action_probs"] = output(task.tracked_params(), train).exp()
        fisher = ObjectiveHessian(task, train, chunk_size=4096, output=output, output_loss=fisher_output_loss)
        attributor = InfluenceFunction(
            task, strategy="cg", damping=damping_ratio * spectral_radius(fisher), chunk_size=512,
            max_iter=max_iter, tol=1e-6, output=output, output_loss=fisher_output_loss,
        )  # fmt: skip
        attributor.cache(train)
        return attributor.attribute(query)[0].double()


def score_learned_weights(ctx: RoundContext) -> Tensor:
    """Grad-dot with per-layer weights fitted by the label-free top-k objective: ``Tensor[n]``."""
    with params_loaded(ctx.model, ctx.snapshot.theta):
        task, train, query = build_round_task(ctx.round_spec())
        weighted = LearnedWeights(GradDot(task, chunk_size=512)).cache(train).fit(query)
        return weighted.attribute(query)[0].double()


SCORERS: dict[str, Callable[[RoundContext], Tensor]] = {
    "grad_dot": score_grad_dot,
    "tracin": score_tracin,
    "influence": score_influence,
    "influence_fisher": score_influence_fisher,
    "learned_weights": score_learned_weights,
}


def retrain_subset(
    model: nn.Module, policy_eval: PolicyEval, snapshot: RoundSnapshot, keep: Tensor, seed: int
) -> dict[str, Tensor]:
    """theta after re-running the round from theta(k) on the records where ``keep`` (bool
    ``Tensor[n]``) is set, with the round's hyperparameters and ``seeded_permutations(.., seed)``."""
    n = len(snapshot.records)
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or keep.shape != (n,):
        raise RlattrError(f"keep: expected a bool Tensor[{n}], got {keep.dtype} {tuple(keep.shape)}")
    m = int(keep.sum())
    if m < 1:
        raise RlattrError("keep: the subset is empty; keep at least one record")
    sub = replace(
        snapshot,
        records=snapshot.records.select(keep),
        permutations=seeded_permutations(m, snapshot.hyper.n_epochs, seed),
        theta_next=None,
    )
    return replay_round(model, policy_eval, sub).theta


def local_ground_truth(
    ctx: RoundContext,
    num_subsets: int,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    targets: Sequence[TargetSpec] = (),
) -> tuple[Tensor, Tensor]:
    """``(masks: Tensor[M, n] bool, values: Tensor[M, m])``: the round re-run from theta(k) on each
    seeded random subset (subset s uses minibatch seed ``seed + s``), then measured by ``ctx.target``
    (column 0) and each of ``targets`` (columns 1 ..)."""
    masks = subset_masks(len(ctx.snapshot.records), num_subsets, fraction, seed)
    return masks, retrain_targets(ctx, masks, seed=seed, targets=targets)


def retrain_targets(
    ctx: RoundContext, masks: Tensor, *, seed: int = 0, targets: Sequence[TargetSpec] = ()
) -> Tensor:
    """``Tensor[M, m]``: re-run the round on each row of ``masks`` (minibatch seed ``seed + s``) and
    measure ``ctx.target`` and ``targets``. With a second ``seed`` on the same masks it measures
    how much of the ground truth is minibatch-order noise."""

    def retrain(weights: Tensor, s: int) -> dict[str, Tensor]:
        return retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, weights > 0, s)

    contexts = [ctx, *(replace(ctx, target=t) for t in targets)]

    def evaluate(theta: dict[str, Tensor]) -> Tensor:
        return torch.cat([c.target_value(theta) for c in contexts])

    return subset_retraining(retrain, evaluate, masks, seed=seed)


def lds_with_ci(
    scores: Tensor, masks: Tensor, targets: Tensor, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Local LDS of ``scores: Tensor[n]`` against ``targets: Tensor[M]`` of subsets ``masks:
    Tensor[M, n]``, with a percentile bootstrap interval over the subsets: ``{lds, lo, hi}``."""
    if scores.dim() != 1 or masks.dim() != 2 or targets.shape != (masks.shape[0],):
        raise RlattrError(
            f"scores, masks, targets: expected [n], [M, n], [M]; got {tuple(scores.shape)}, "
            f"{tuple(masks.shape)}, {tuple(targets.shape)}"
        )
    value = float(lds(scores[None], masks.double(), targets[:, None]))
    pred = (masks.double() @ scores.double()).numpy()
    t = targets.double().numpy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_boot, len(t)))
    boot = spearman(pred[idx], t[idx])
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"lds": value, "lo": float(lo), "hi": float(hi)}


def local_lds(
    ctx: RoundContext,
    scores: dict[str, Tensor],
    masks: Tensor,
    targets: Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{scorer: {lds, lo, hi}}`` for precomputed ``scores`` (see :data:`SCORERS`)."""
    n = len(ctx.snapshot.records)
    bad = [k for k, v in scores.items() if v.shape != (n,)]
    if bad:
        raise RlattrError(f"scores: expected Tensor[{n}] per scorer, wrong shape for {bad}")
    return {k: lds_with_ci(v, masks, targets, n_boot=n_boot, seed=seed) for k, v in scores.items()}


def intervention_thetas(
    ctx: RoundContext, scores: Tensor, *, p: float, n_random: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Policies after re-running the round on: every record (``full``), all but the bottom records
    by IIF's neg-bottom rule with fraction ``p`` (``bottom``), and all but as many random records
    (``random``: a list of ``n_random`` draws). Every arm uses minibatch seed ``seed``.

    Returns ``{"full": theta, "bottom": theta, "random": [theta, ...], "n_dropped": int}``.
    """
    n = len(ctx.snapshot.records)
    if scores.shape != (n,):
        raise RlattrError(f"scores: expected Tensor[{n}], got {tuple(scores.shape)}")
    if n_random < 1:
        raise RlattrError(f"n_random: must be >= 1, got {n_random}")
    kept = make_rule("neg-bottom", p=p)(scores.float()).keep

    def run(keep: Tensor) -> dict[str, Tensor]:
        return retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, keep, seed)

    randoms = [make_rule("random", p=p, seed=seed + 1 + r)(scores.float()).keep for r in range(n_random)]
    return {
        "full": run(torch.ones(n, dtype=torch.bool)),
        "bottom": run(kept),
        "random": [run(k) for k in randoms],
        "n_dropped": int(n - kept.sum()),
    }


__all__ = [
    "SCORERS",
    "RoundContext",
    "intervention_thetas",
    "lds_with_ci",
    "local_ground_truth",
    "local_lds",
    "params_loaded",
    "retrain_targets",
    "score_grad_dot",
    "score_influence",
    "score_influence_fisher",
    "score_learned_weights",
    "score_tracin",
]
