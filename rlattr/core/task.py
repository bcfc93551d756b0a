"""The Task: every model-specific piece of an attribution problem, in one object.

A Task names the model, the parameters whose gradients are tracked (with a group label per
tensor, e.g. its layer), a per-record training loss and an optional target. The algorithms in
:mod:`rlattr.core` never look inside the model: they only call the Task's functions with a dict of
tracked parameters, so the same engine serves a classifier, a PPO round and an RLHF step.

Functions receive ``params``: a ``dict[str, Tensor]`` of the *tracked* parameters only. Call the
model with :func:`torch.func.functional_call` (``functional_call(model, params, (x,))``); the
untracked parameters and buffers are taken from the module itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from rlattr.errors import RlattrError

Params = dict[str, Tensor]
Batch = Any  # a pytree (dict / tuple / list) of tensors sharing the leading record dimension
LossFn = Callable[[Params, Batch], Tensor]
TargetFn = Callable[[Params, Batch], Tensor]
ParamSelector = Sequence[str] | str | Callable[[str, nn.Parameter], bool] | None
GroupSpec = Literal["module", "tensor", "all"] | Callable[[str], str] | Mapping[str, str]

L2Spec = float | Mapping[str, float] | Callable[[str], float]

TARGET_GOALS = ("lower", "raise")


def _module_group(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


_GROUPERS: dict[str, Callable[[str], str]] = {
    "module": _module_group,
    "tensor": lambda name: name,
    "all": lambda name: "all",
}


@dataclass
class Task:
    """An attribution problem.

    Args:
        model: the ``nn.Module`` whose parameters are attributed.
        loss: per-record training loss, ``(params, batch) -> Tensor[n]``, one value per record of
            ``batch``. Record i's loss must depend on record i alone (no batch statistics) for
            per-record gradients and directional scores to mean what they say.
        target: what the attribution explains, ``(params, batch) -> Tensor[]`` or ``Tensor[m]``.
        target_goal: ``"lower"`` when the target is a loss to lower (a test loss), ``"raise"`` when
            it is a quantity to raise (a log-prob, a return). Scores are signed so that a positive
            score always means the record *helps* the target.
        params: which parameters are tracked: ``None`` (every parameter with ``requires_grad``),
            a list of names, a regular expression matched against names, or a predicate
            ``(name, parameter) -> bool``.
        groups: how tracked tensors are grouped for per-group breakdowns: ``"module"`` (the
            owning module, i.e. a layer), ``"tensor"``, ``"all"``, a mapping name -> label, or a
            function name -> label.
    """

    model: nn.Module
    loss: LossFn
    target: TargetFn | None = None
    target_goal: str = "lower"
    params: ParamSelector = None
    groups: GroupSpec = "module"
    tracked_names: list[str] = field(init=False)
    group_of: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss):
            raise TypeError(f"loss: expected a callable (params, batch) -> Tensor[n], got {self.loss!r}")
        if self.target is not None and not callable(self.target):
            raise TypeError(f"target: expected a callable (params, batch) -> Tensor, got {self.target!r}")
        if self.target_goal not in TARGET_GOALS:
            raise RlattrError(f"target_goal: got {self.target_goal!r}; supported: {TARGET_GOALS}")
        self.tracked_names = self._resolve_names()
        self.group_of = self._resolve_groups()

    def _resolve_names(self) -> list[str]:
        named = dict(self.model.named_parameters())
        sel = self.params
        if sel is None:
            names = [n for n, p in named.items() if p.requires_grad]
        elif isinstance(sel, str):
            pattern = re.compile(sel)
            names = [n for n in named if pattern.search(n)]
        elif callable(sel):
            names = [n for n, p in named.items() if sel(n, p)]
        else:
            unknown = [n for n in sel if n not in named]
            if unknown:
                shown = ", ".join(list(named)[:8]) + (" ..." if len(named) > 8 else "")
                raise RlattrError(f"params: unknown parameter name(s) {unknown}; the model has: {shown}")
            names = [n for n in named if n in set(sel)]
        if not names:
            raise RlattrError(f"params: selector {sel!r} matches no parameter of the model")
        return names

    def _resolve_groups(self) -> dict[str, str]:
        spec = self.groups
        if isinstance(spec, str):
            if spec not in _GROUPERS:
                raise RlattrError(
                    f"groups: got {spec!r}; supported: {sorted(_GROUPERS)}, a mapping or a callable"
                )
            fn = _GROUPERS[spec]
            return {n: fn(n) for n in self.tracked_names}
        if isinstance(spec, Mapping):
            missing = [n for n in self.tracked_names if n not in spec]
            if missing:
                raise RlattrError(f"groups: no group label for tracked parameter(s) {missing}")
            return {n: str(spec[n]) for n in self.tracked_names}
        if callable(spec):
            return {n: str(spec(n)) for n in self.tracked_names}
        raise TypeError(f"groups: expected a str, mapping or callable, got {type(spec).__name__}")

    @property
    def group_names(self) -> list[str]:
        """Group labels in order of first appearance among the tracked parameters."""
        return list(dict.fromkeys(self.group_of[n] for n in self.tracked_names))

    @property
    def num_params(self) -> int:
        named = dict(self.model.named_parameters())
        return sum(named[n].numel() for n in self.tracked_names)

    def tracked_params(self) -> Params:
        """The current values of the tracked parameters, detached: ``dict[name, Tensor]``."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.tracked_names}

    def check_params(self, params: Params, what: str = "params") -> None:
        """Raise an RlattrError naming ``what`` unless ``params`` holds every tracked parameter with
        the model's shape (extra entries are allowed and ignored)."""
        named = dict(self.model.named_parameters())
        missing = [n for n in self.tracked_names if n not in params]
        bad = [n for n in self.tracked_names if n in params and params[n].shape != named[n].shape]
        if missing or bad:
            raise RlattrError(f"{what}: missing tracked parameter(s) {missing}, wrong shape for {bad}")

    def resolve_params(self, params: Params | None = None) -> Params:
        """The tracked parameters to evaluate at, detached: the model's current values when
        ``params`` is None, else ``params``' tracked entries (checked by :meth:`check_params`)."""
        if params is None:
            return self.tracked_params()
        self.check_params(params)
        return {n: params[n].detach() for n in self.tracked_names}

    def l2_coefficients(self, l2: L2Spec, what: str = "l2") -> float | dict[str, float]:
        """The L2 coefficient of every tracked parameter: ``l2`` itself for a number (one for all);
        for a mapping (every tracked name -> coefficient) or a callable (name -> coefficient), the
        dict ``{tracked name: coefficient}``, or the common number when they are all equal. Raises an
        RlattrError naming ``what`` for a negative or non-finite coefficient or a mapping that misses
        (or adds) names."""
        supported = "a finite number >= 0, a mapping from every tracked parameter name to one, or a callable name -> one"
        if isinstance(l2, Mapping):
            missing = [n for n in self.tracked_names if n not in l2]
            extra = [n for n in l2 if n not in self.tracked_names]
            if missing or extra:
                raise RlattrError(
                    f"{what}: got a mapping missing tracked parameter(s) {missing} and with unknown name(s) "
                    f"{extra}; supported: {supported}"
                )
            coefs = {n: l2[n] for n in self.tracked_names}
        elif callable(l2):
            coefs = {n: l2(n) for n in self.tracked_names}
        else:
            coefs = {n: l2 for n in self.tracked_names}
        for name, value in coefs.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
            ):
                where = f" for {name!r}" if isinstance(l2, Mapping) or callable(l2) else ""
                raise RlattrError(f"{what}: got {value!r}{where}; supported: {supported}")
        values = set(float(v) for v in coefs.values())
        return values.pop() if len(values) == 1 else {n: float(v) for n, v in coefs.items()}

    def target_sign(self) -> float:
        """-1 for a target to raise, +1 for a loss to lower: ``g_q = sign * grad target``."""
        return 1.0 if self.target_goal == "lower" else -1.0

    def require_target(self) -> TargetFn:
        if self.target is None:
            raise RlattrError("target: this Task has no target; pass target=(params, batch) -> Tensor")
        return self.target
