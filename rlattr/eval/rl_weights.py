"""Learned parameter-group weights on one PPO round, fitted on held-out targets (issue 16).

The round's Task (:func:`rlattr.rl.attribution.build_round_task`, one group per parameter tensor
by default) is scored by a base method whose scores split by group, the weights of
:class:`rlattr.core.methods.LearnedWeights` are fitted label-free on one set of queries and the
weighted and unweighted scores are compared on another.

**Queries.** :func:`parts_return_target` makes one return surrogate per part of a set of
transitions, ``f_j(theta) = mean_{t in part j} log pi_theta(a_t|s_t) A_t`` (raw advantages, the
surrogate of :class:`rlattr.rl.targets.ReturnTarget`). The fit queries and the evaluation queries
are the same function on two disjoint sets of held-out transitions, so one Task serves both.

**Bases** (:data:`WEIGHT_BASES`): ``grad_dot``, ``<grad f(theta(k)), -grad L_i(theta(k))>``
(buffer-normalised advantages, as IIF scores); ``tracin``, the learning-rate-weighted sum of the
same product at the start of every ``every``-th epoch of the round (the checkpoints come from the
exact replay, :func:`epoch_checkpoints`), TracIn's checkpoint form over the round's update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from rlattr.core.methods import Attributor, GradDot, LearnedWeights, TracIn
from rlattr.core.task import Batch, GroupSpec, Task
from rlattr.errors import RlattrError
from rlattr.eval.metrics import lds
from rlattr.eval.rl_validity import RoundContext, params_loaded
from rlattr.rl.attribution import build_round_task
from rlattr.rl.ppo import PolicyEval
from rlattr.rl.records import RecordBatch
from rlattr.rl.replay import replay_round
from rlattr.rl.targets import CustomTarget


def parts_return_target(parts: Sequence[RecordBatch]) -> CustomTarget:
    """One return surrogate per record batch of ``parts``: the target is ``Tensor[len(parts)]``."""
    if not parts or not all(isinstance(p, RecordBatch) for p in parts):
        raise RlattrError(f"parts: expected a non-empty list of RecordBatch, got {type(parts).__name__}")
    if any(p.has_dict_observations for p in parts):
        raise RlattrError("parts: got dict observations; supported: tensor observations")
    sizes = [len(p) for p in parts]
    rows = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(sizes))
    mean_of_part = torch.zeros(len(parts), sum(sizes), dtype=torch.float64)
    mean_of_part[rows, torch.arange(sum(sizes))] = 1.0 / torch.tensor(sizes, dtype=torch.float64)[rows]
    batch = {
        "observations": torch.cat([p.observations for p in parts]),  # type: ignore[misc]
        "actions": torch.cat([p.actions for p in parts]),
        "advantages": torch.cat([p.advantages for p in parts]),
        "mean_of_part": mean_of_part,
    }

    def fn(policy_eval: PolicyEval, params: dict[str, Tensor], b: Batch) -> Tensor:
        logp = policy_eval(params, b["observations"], b["actions"]).log_prob
        return b["mean_of_part"].to(logp) @ (logp * b["advantages"].to(logp))

    return CustomTarget(fn, batch, goal="raise", name="return_parts")


def epoch_checkpoints(ctx: RoundContext, every: int = 1) -> list[dict[str, Tensor]]:
    """Actor parameters at the start of epochs ``0, every, 2 every ...`` of the round's update (the
    exact replay truncated to that many epochs; epoch 0 is theta(k))."""
    hyper = ctx.snapshot.hyper
    if not isinstance(every, int) or not 1 <= every <= hyper.n_epochs:
        raise RlattrError(f"every: got {every!r}; supported: an integer in [1, {hyper.n_epochs}]")
    out = []
    for epochs in range(0, hyper.n_epochs, every):
        if epochs == 0:
            theta = ctx.snapshot.theta
        else:
            short = replace(ctx.snapshot, hyper=replace(hyper, n_epochs=epochs), theta_next=None)
            theta = replay_round(ctx.model, ctx.policy_eval, short).theta
        out.append({k: theta[k].detach().clone() for k in ctx.actor_params})
    return out


def _grad_dot(ctx: RoundContext, task: Task, every: int) -> Attributor:
    return GradDot(task, chunk_size=256)


def _tracin(ctx: RoundContext, task: Task, every: int) -> Attributor:
    ckpts = epoch_checkpoints(ctx, every)
    return TracIn(task, ckpts, [ctx.snapshot.hyper.learning_rate] * len(ckpts), chunk_size=256)


WEIGHT_BASES: dict[str, Callable[[RoundContext, Task, int], Attributor]] = {
    "grad_dot": _grad_dot,
    "tracin": _tracin,
}


VARIANTS = {False: "learned_weights", True: "learned_weights_normalized"}


@dataclass
class WeightedRound:
    """A base method's per-group scores of the evaluation queries and the weights fitted elsewhere.

    Attributes:
        contrib: ``Tensor[m, n, G]``, each group's part of the base score (they sum to it).
        weights: ``{variant: Tensor[G]}``, the learned weights of each fit (``learned_weights``,
            and ``learned_weights_normalized`` for ``LearnedWeights(normalize=True)``).
        group_names: the G labels. history: ``{variant: the fit's loss per Adam step}``.
    """

    contrib: Tensor
    weights: dict[str, Tensor]
    group_names: list[str]
    history: dict[str, list[float]] = field(default_factory=dict)

    def base_scores(self) -> Tensor:
        """``Tensor[m, n]``: the base method (every weight 1)."""
        return self.contrib.sum(-1)

    def weighted_scores(self, variant: str = "learned_weights") -> Tensor:
        """``Tensor[m, n]``: the base method with the weights of ``variant``."""
        if variant not in self.weights:
            raise RlattrError(f"variant: got {variant!r}; supported: {sorted(self.weights)}")
        return self.contrib @ self.weights[variant].to(self.contrib)

    def group_share(self) -> dict[str, float]:
        """``{group: ||contrib_g||_F / sum_h ||contrib_h||_F}``: how much each group weighs in the scores."""
        norms = self.contrib.flatten(0, 1).norm(dim=0)
        return dict(zip(self.group_names, (norms / norms.sum()).tolist(), strict=True))

    def lds_report(self, masks: Tensor, values: Tensor) -> dict[str, object]:
        """LDS of the base, of each weighted variant and of each group alone against subsets
        ``masks: Tensor[M, n]`` with target values ``values: Tensor[M, m]``; the weights by group."""

        def score(s: Tensor) -> float:
            return float(lds(s, masks.double(), values.double()))

        out: dict[str, object] = {"lds": score(self.base_scores())}
        for variant, w in self.weights.items():
            out[f"lds_{variant}"] = score(self.weighted_scores(variant))
            out[f"weights_{variant}"] = dict(zip(self.group_names, w.tolist(), strict=True))
        out["group_lds"] = {g: score(self.contrib[..., j]) for j, g in enumerate(self.group_names)}
        out["group_share"] = self.group_share()
        return out


def learned_weights_round(
    ctx: RoundContext,
    base: str,
    fit_query: Batch,
    *,
    groups: GroupSpec = "tensor",
    every: int = 1,
    normalize: Sequence[bool] = (False,),
    top_k: int | None = None,
    reg: float = 1e-3,
    steps: int = 300,
) -> WeightedRound:
    """Fit the weights on ``fit_query`` (a batch of ``ctx.target``'s function, e.g. the ``batch``
    of another :func:`parts_return_target`), once per entry of ``normalize`` (see
    :class:`~rlattr.core.methods.LearnedWeights`), and split the base scores of ``ctx.target``'s
    own batch by group, all at theta(k)."""
    if base not in WEIGHT_BASES:
        raise RlattrError(f"base: got {base!r}; supported: {sorted(WEIGHT_BASES)}")
    if not normalize or len(set(normalize)) != len(normalize):
        raise RlattrError(f"normalize: got {list(normalize)}; supported: distinct booleans, at least one")
    weights, history = {}, {}
    with params_loaded(ctx.model, ctx.snapshot.theta):
        task, train, query = build_task(ctx, groups)
        attributor = WEIGHT_BASES[base](ctx, task, every).cache(train)
        for norm in normalize:
            fitted = LearnedWeights(attributor, top_k=top_k, reg=reg, steps=steps, normalize=norm)
            fitted.cache(train).fit(fit_query)
            weights[VARIANTS[norm]], history[VARIANTS[norm]] = fitted.weights.double(), fitted.history
        contrib = attributor.attribute_by_group(query).detach().double()
    return WeightedRound(contrib, weights, list(task.group_names), history)


def build_task(ctx: RoundContext, groups: GroupSpec) -> tuple[Task, Batch, Batch]:
    """The round Task of ``ctx`` with the given parameter groups: ``(task, train, query)``."""
    return build_round_task(replace(ctx.round_spec(), groups=groups))


__all__ = [
    "VARIANTS",
    "WEIGHT_BASES",
    "WeightedRound",
    "build_task",
    "epoch_checkpoints",
    "learned_weights_round",
    "parts_return_target",
]
