"""Targets: what a round's records are scored against (quantities to *raise*).

* :class:`ReturnTarget`: ``f(theta) = mean_j log pi_theta(a_j|s_j) * A_j`` with raw (unnormalised)
  advantages, a REINFORCE-with-baseline surrogate whose gradient at theta(k) is the policy-gradient
  estimate of the return's gradient; evaluated on the round's own buffer (the paper's choice) or on
  separately collected validation transitions.
* :class:`ActionTarget`: ``f(theta) = log pi_theta(a|s)`` for chosen (state, action) pairs; the mean
  over them, or one target per pair (``reduce="none"``, for behaviour-formation plots).
* :class:`CustomTarget`: any ``(policy_eval, params, batch) -> Tensor`` the user writes.

A target spec is unbound: :meth:`TargetSpec.build` binds it to a policy evaluator and a round,
returning the core ``TargetFn`` and the batch it is evaluated on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlattr.core.task import Batch, Params, TargetFn
from rlattr.errors import RlattrError
from rlattr.rl.ppo import PolicyEval
from rlattr.rl.records import Observations, RecordBatch, as_observations, num_observations

RETURN_SOURCES = ("buffer", "validation")
ACTION_REDUCTIONS = ("mean", "none")


class TargetSpec(ABC):
    """An unbound target. ``goal`` is ``"raise"`` (a log-prob, a return) or ``"lower"``."""

    name: str = "target"
    goal: str = "raise"

    @abstractmethod
    def build(
        self, policy_eval: PolicyEval, records: RecordBatch, validation: RecordBatch | None = None
    ) -> tuple[TargetFn, Batch]:
        """``(target_fn, batch)``: ``target_fn(params, batch) -> Tensor[]`` or ``Tensor[m]``."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description, saved in the run's metadata."""
        return {"name": self.name, "goal": self.goal}


def _log_prob(policy_eval: PolicyEval, params: Params, batch: Batch) -> Tensor:
    return policy_eval(params, batch["observations"], batch["actions"]).log_prob


class ReturnTarget(TargetSpec):
    """REINFORCE surrogate ``mean_j log pi(a_j|s_j) * A_j`` with raw advantages.

    Args:
        source: ``"buffer"`` (the round's own records) or ``"validation"`` (a RecordBatch of
            separately collected transitions passed to :meth:`build`).
    """

    name = "return"

    def __init__(self, source: str = "buffer") -> None:
        if source not in RETURN_SOURCES:
            raise RlattrError(f"source: got {source!r}; supported: {RETURN_SOURCES}")
        self.source = source

    def build(
        self, policy_eval: PolicyEval, records: RecordBatch, validation: RecordBatch | None = None
    ) -> tuple[TargetFn, Batch]:
        data = records if self.source == "buffer" else validation
        if data is None:
            raise RlattrError("validation: ReturnTarget(source='validation') needs a validation RecordBatch")
        batch = {
            "observations": data.observations,
            "actions": data.actions,
            "advantages": data.advantages,
        }

        def target(params: Params, b: Batch) -> Tensor:
            logp = _log_prob(policy_eval, params, b)
            return (logp * b["advantages"].to(dtype=logp.dtype, device=logp.device)).mean()

        return target, batch

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source}


class ActionTarget(TargetSpec):
    """``log pi(a|s)`` of chosen pairs.

    Args:
        observations: ``Tensor[m, *obs_shape]`` (or ``{key: Tensor[m, ...]}`` for dict observation
            spaces), the states.
        actions: ``Tensor[m, action_dim]`` (or ``Tensor[m]`` for Discrete), the actions.
        reduce: ``"mean"`` (one scalar target) or ``"none"`` (m targets, scores ``Tensor[m, n]``).
    """

    name = "action"

    def __init__(self, observations: Observations, actions: Tensor, reduce: str = "mean") -> None:
        if reduce not in ACTION_REDUCTIONS:
            raise RlattrError(f"reduce: got {reduce!r}; supported: {ACTION_REDUCTIONS}")
        obs, act = as_observations(observations), torch.as_tensor(actions)
        m = num_observations(obs) if isinstance(obs, dict) or obs.dim() else 0
        if act.dim() == 0 or m != act.shape[0] or m == 0:
            n_act = act.shape[0] if act.dim() else 0
            raise RlattrError(
                f"observations/actions: need the same non-zero number of pairs, got {m} and {n_act}"
            )
        if act.dim() == 1:
            act = act.unsqueeze(1)
        self.observations, self.actions, self.reduce = obs, act, reduce

    def build(
        self, policy_eval: PolicyEval, records: RecordBatch, validation: RecordBatch | None = None
    ) -> tuple[TargetFn, Batch]:
        batch = {"observations": self.observations, "actions": self.actions}
        reduce = self.reduce

        def target(params: Params, b: Batch) -> Tensor:
            logp = _log_prob(policy_eval, params, b)
            return logp.mean() if reduce == "mean" else logp

        return target, batch

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reduce": self.reduce, "n_pairs": num_observations(self.observations)}


class CustomTarget(TargetSpec):
    """A user target ``fn(policy_eval, params, batch) -> Tensor[] | Tensor[m]``.

    Args:
        fn: the target; ``policy_eval(params, obs, actions)`` gives log-probs, entropies, values.
        batch: the data it is evaluated on; ``None`` means the round's records (``as_batch()``).
        goal: ``"raise"`` or ``"lower"``.
        name: a label for logs and metadata.
    """

    def __init__(
        self,
        fn: Callable[[PolicyEval, Params, Batch], Tensor],
        batch: Batch | None = None,
        goal: str = "raise",
        name: str = "custom",
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable (policy_eval, params, batch) -> Tensor, got {fn!r}")
        if goal not in ("raise", "lower"):
            raise RlattrError(f"goal: got {goal!r}; supported: ('raise', 'lower')")
        self.fn, self.batch, self.goal, self.name = fn, batch, goal, name

    def build(
        self, policy_eval: PolicyEval, records: RecordBatch, validation: RecordBatch | None = None
    ) -> tuple[TargetFn, Batch]:
        fn = self.fn
        batch = self.batch if self.batch is not None else records.as_batch()
        return (lambda params, b: fn(policy_eval, params, b)), batch


TARGETS: dict[str, Callable[..., TargetSpec]] = {"return": ReturnTarget, "action": ActionTarget}


def make_target(target: str | TargetSpec, **kwargs: Any) -> TargetSpec:
    """A TargetSpec from a name in :data:`TARGETS` (with its keyword arguments) or a spec itself."""
    if isinstance(target, TargetSpec):
        if kwargs:
            raise RlattrError(f"target: extra arguments {sorted(kwargs)} given with a TargetSpec instance")
        return target
    if not isinstance(target, str) or target not in TARGETS:
        raise RlattrError(f"target: got {target!r}; supported: {sorted(TARGETS)} or a TargetSpec instance")
    return TARGETS[target](**kwargs)


__all__ = ["ActionTarget", "CustomTarget", "ReturnTarget", "TARGETS", "TargetSpec", "make_target"]
