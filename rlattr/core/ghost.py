"""Per-record gradient dot products from one ordinary backward: layer inputs ``a``, output gradients ``d``.

For a layer ``y = W a (+ b)`` applied to the tokens t of record i, record i's share of the weight
gradient is ``sum_t d_t a_t^T`` (``d_t`` the gradient of the loss with respect to ``y_t``), so its dot
product with a direction ``G`` (a tensor shaped like ``W``) is

    <G, grad_W L_i> = sum_t d_t^T G a_t                                       ("G form")

and, when ``G`` is itself a sum of outer products ``sum_s d'_s a'_s^T`` over the tokens s of another
backward (the gradient of a target),

    <G, grad_W L_i> = sum_t sum_s (d_t . d'_s) (a'_s . a_t)                     ("ghost form")

which costs ``S (in + out)`` per token instead of ``in * out``. :class:`GhostCapture` records
``(a, d)`` for every layer that owns a tracked parameter while a forward runs (the gradients arrive
during the following backward); :func:`build_target` turns a captured target backward into a
:class:`GhostTarget` (``G`` per parameter, and ``(a', d')`` where the ghost form is cheaper);
:func:`record_dots` gives every record's dot product with it, and :func:`rows_grad_sum` the
gradient contribution of any subset of records (to remove it from accumulated gradients).

Handlers for layer types live in a registry (:func:`register_handler`; the handlers are in
:mod:`rlattr.core.ghost_layers`, re-exported here): ``nn.Linear``, ``nn.Embedding`` and
``nn.LayerNorm`` built in; adapters register others (transformers' ``Conv1D``) without this module
importing them. Layers are called on ``Tensor[B, ..., in]``; records are the
leading dimension B. A record's loss must depend on that record alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.core.ghost_layers import (
    EmbeddingHandler,
    LayerHandler,
    LayerNormHandler,
    LayerRecord,
    LinearHandler,
    handler_for,
    live_tokens,
    register_handler,
)
from rlattr.errors import RlattrError


def _inside_backward() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)


class GhostCapture:
    """Records ``(a, d)`` of every layer of ``model`` that owns a tracked parameter.

    Args:
        model: the module; parameters with ``requires_grad`` are tracked.
        skip: module names (exact) left to a custom capture (see :meth:`add_record`).

    ``param_names[layer][local]`` gives the canonical (``named_parameters``) name of each tracked
    parameter of a captured layer (tied weights share one name); ``uncovered`` lists tracked
    parameters owned by no captured layer.
    """

    def __init__(self, model: nn.Module, skip: tuple[str, ...] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise RlattrError(f"model: got {type(model).__name__}; supported: torch.nn.Module")
        canonical = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.tracked = dict(canonical)
        self.layers: dict[str, tuple[nn.Module, LayerHandler]] = {}
        self.param_names: dict[str, dict[str, str]] = {}
        covered: set[str] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            own = {
                k: canonical[id(p)] for k, p in module.named_parameters(recurse=False) if id(p) in canonical
            }
            if not own:
                continue
            self.param_names[name] = own
            handler = handler_for(module)
            if name in skip or handler is None:
                continue
            self.layers[name] = (module, handler)
            covered.update(own.values())
        self.uncovered = sorted(set(canonical.values()) - covered)
        self._sink: list[LayerRecord] | None = None
        self._rows: int | None = None

    def add_record(self, rec: LayerRecord, out: Tensor | None = None) -> None:
        """Keep a record made by a custom hook; ``out``'s gradient becomes ``rec.d`` when given."""
        if self._sink is None:
            return
        if out is not None:
            out.register_hook(_setter(rec))
        self._sink.append(rec)

    def _hook(self, name: str, module: nn.Module, handler: LayerHandler) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            # gradient checkpointing re-runs forwards inside backward; their outputs get no gradient
            if self._sink is None or not torch.is_grad_enabled() or _inside_backward():
                return None
            got = handler.capture(mod, args, output, self._rows)
            if got is None or not got[1].requires_grad:
                return None
            rec = LayerRecord(name, module, handler, got[0])
            got[1].register_hook(_setter(rec))
            self._sink.append(rec)
            return got[1] if got[1] is not output else None

        return hook

    @contextmanager
    def recording(self, rows: int | None = None) -> Iterator[list[LayerRecord]]:
        """Capture during the forwards run inside; ``d`` fills in during their backward.

        ``rows``: the number of records in those forwards (lets shared-input layers be split per record).
        """
        sink: list[LayerRecord] = []
        handles = [m.register_forward_hook(self._hook(n, m, h)) for n, (m, h) in self.layers.items()]
        self._sink, self._rows = sink, rows
        try:
            yield sink
        finally:
            self._sink, self._rows = None, None
            for h in handles:
                h.remove()


def _setter(rec: LayerRecord) -> Callable[[Tensor], None]:
    def set_grad(grad: Tensor) -> None:
        rec.d = grad.detach()

    return set_grad


TARGET_FORMS = ("auto", "ghost", "dense")


@dataclass
class GhostTarget:
    """A direction ``G`` (``dict[param name, Tensor]``) and, per layer, the token features of its ghost form.

    ``ghost[layer] = (a', d')``: ``Tensor[S, in]``, ``Tensor[S, out]`` with ``G_weight = d'^T a'``
    (transposed for a transposed layer); such layers score their weight in ghost form.
    """

    direction: dict[str, Tensor]
    ghost: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def build_target(
    capture: GhostCapture, records: list[LayerRecord], direction: dict[str, Tensor], *, form: str = "auto"
) -> GhostTarget:
    """The :class:`GhostTarget` of ``direction`` (the gradient of the backward that filled ``records``).

    A layer's weight may take the ghost form when its weight is used by that layer alone (no tied
    weights). ``form="auto"`` takes it where ``S (in + out) < in * out`` for the S tokens with a
    non-zero output gradient; ``"ghost"`` wherever possible; ``"dense"`` nowhere.
    """
    if form not in TARGET_FORMS:
        raise RlattrError(f"form: got {form!r}; supported: {TARGET_FORMS}")
    owners: dict[str, int] = {}
    for names in capture.param_names.values():
        for canon in set(names.values()):
            owners[canon] = owners.get(canon, 0) + 1
    by_layer: dict[str, list[LayerRecord]] = {}
    for rec in records:
        if rec.d is not None:
            by_layer.setdefault(rec.name, []).append(rec)
    ghost: dict[str, tuple[Tensor, Tensor]] = {}
    for name, recs in by_layer.items() if form != "dense" else ():
        handler = recs[0].handler
        weight = capture.param_names.get(name, {}).get("weight")
        if not handler.ghost_weight or weight is None or owners.get(weight, 0) != 1:
            continue
        feats = [handler.features(r) for r in recs]
        a = torch.cat([f[0].reshape(-1, f[0].shape[-1]) for f in feats])
        d = torch.cat([f[1].reshape(-1, f[1].shape[-1]) for f in feats])
        live = d.abs().sum(1) > 0
        a, d = a[live], d[live]
        if form == "ghost" or a.shape[0] * (a.shape[1] + d.shape[1]) < a.shape[1] * d.shape[1]:
            ghost[name] = (a, d)
    return GhostTarget(direction=direction, ghost=ghost)


def _ghost_dots(rec: LayerRecord, a2: Tensor, d2: Tensor, chunk: int = 4096) -> Tensor:
    a, d, row, b = live_tokens(*rec.handler.features(rec))
    parts = [
        ((d[i : i + chunk] @ d2.T) * (a[i : i + chunk] @ a2.T)).sum(1) for i in range(0, a.shape[0], chunk)
    ]
    per_token = torch.cat(parts) if parts else a.new_zeros(0)
    return torch.zeros(b, device=a.device, dtype=per_token.dtype).index_add_(0, row, per_token)


def record_dots(capture: GhostCapture, records: list[LayerRecord], target: GhostTarget) -> Tensor:
    """``Tensor[B]``: ``<G, grad L_i>`` for the B records of one captured backward (all layers summed).

    Layers whose output gradient never arrived (re-run forwards of gradient checkpointing) are
    skipped: their calls are counted by the captured originals.
    """
    live = [r for r in records if r.d is not None]
    if not live:
        raise RlattrError("records: no captured layer received a gradient; run backward inside recording()")
    total = torch.zeros(live[0].rows, device=target_device(target), dtype=torch.float64)
    for rec in live:
        if rec.rows != total.numel():
            raise RlattrError(
                f"records: layer {rec.name!r} saw {rec.rows} record(s) where others saw {total.numel()} (an input "
                "shared across records); supported: per-record inputs, or recording(rows=...) for embeddings"
            )
        names = capture.param_names.get(rec.name, {})
        direction = {k: target.direction[c] for k, c in names.items() if c in target.direction}
        pair = target.ghost.get(rec.name)
        part = rec.handler.dots(rec, direction, skip_weight=pair is not None)
        if pair is not None:
            part = part + _ghost_dots(rec, *pair)
        total = total + part.to(total.device)
    return total


def target_device(target: GhostTarget) -> torch.device:
    first = next(iter(target.direction.values()), None)
    return first.device if first is not None else torch.device("cpu")


def rows_grad_sum(capture: GhostCapture, records: list[LayerRecord], rows: Tensor) -> dict[str, Tensor]:
    """``dict[param name, Tensor]``: the summed gradient contributions of the records where ``rows`` holds.

    ``rows``: ``Tensor[B]`` bool over the records of ``records`` (one captured backward).
    """
    out: dict[str, Tensor] = {}
    for rec in records:
        if rec.d is None:
            continue
        names = capture.param_names.get(rec.name, {})
        for local, g in rec.handler.grad_sum(rec, rows.to(g_device(rec))).items():
            canon = names.get(local)
            if canon is not None:
                out[canon] = out[canon] + g if canon in out else g
    return out


def g_device(rec: LayerRecord) -> torch.device:
    return rec.d[0].device if isinstance(rec.d, tuple) else rec.d.device


__all__ = [
    "EmbeddingHandler",
    "GhostCapture",
    "GhostTarget",
    "LayerHandler",
    "LayerNormHandler",
    "LayerRecord",
    "LinearHandler",
    "TARGET_FORMS",
    "build_target",
    "handler_for",
    "live_tokens",
    "record_dots",
    "register_handler",
    "rows_grad_sum",
]
