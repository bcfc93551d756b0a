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

Handlers for layer types live in a registry (:func:`register_handler`): ``nn.Linear``,
``nn.Embedding`` and ``nn.LayerNorm`` here; adapters register others (transformers' ``Conv1D``)
without this module importing them. Layers are called on ``Tensor[B, ..., in]``; records are the
leading dimension B. A record's loss must depend on that record alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.errors import RlattrError


@dataclass
class LayerRecord:
    """One call of one captured layer: its input ``a`` and (after backward) its output gradient ``d``."""

    name: str
    module: nn.Module
    handler: LayerHandler
    a: Any
    d: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        first = self.a[0] if isinstance(self.a, tuple) else self.a
        return int(first.shape[0])


class LayerHandler:
    """How one layer type's parameter gradients follow from ``(a, d)``; subclass per layer type.

    ``params`` maps the layer's local parameter names (``"weight"``, ``"bias"``) to tensors shaped
    like them (directions, or the accumulators of :func:`rows_grad_sum`).
    """

    ghost_weight = False  # whether the weight term has the ghost form (a, d token features)

    def capture(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, rows: int | None = None
    ) -> tuple[Any, Tensor] | None:
        """``(a, out)``: what to keep of the input, and the output tensor whose gradient is ``d``.

        ``rows``: the number of records of the forward, when known. An ``out`` other than ``output``
        replaces the layer's output (same values, e.g. a broadcast made explicit).
        """
        x = args[0]
        if not isinstance(output, Tensor) or not isinstance(x, Tensor):
            return None
        return x.detach(), output

    def features(self, rec: LayerRecord) -> tuple[Tensor, Tensor]:
        """``a`` and ``d`` as ``Tensor[B, T, in]``, ``Tensor[B, T, out]`` (float32)."""
        a, d = rec.a, rec.d
        return _wide(a.reshape(a.shape[0], -1, a.shape[-1])), _wide(d.reshape(d.shape[0], -1, d.shape[-1]))

    def dots(self, rec: LayerRecord, direction: dict[str, Tensor], skip_weight: bool) -> Tensor:
        """``Tensor[B]``: every record's ``sum_p <direction_p, grad_p L_i>`` over the layer's parameters."""
        raise NotImplementedError

    def grad_sum(self, rec: LayerRecord, rows: Tensor) -> dict[str, Tensor]:
        """The layer's parameter gradients from the records ``rows`` (``Tensor[B]`` bool) only."""
        raise NotImplementedError


class LinearHandler(LayerHandler):
    """``y = a W^T + b`` (``nn.Linear``); ``transposed=True`` for ``y = a W + b`` (GPT-2's Conv1D)."""

    ghost_weight = True

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def dots(self, rec: LayerRecord, direction: dict[str, Tensor], skip_weight: bool) -> Tensor:
        a, d, row, b = live_tokens(*self.features(rec))
        per_token = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        if "weight" in direction and not skip_weight:
            g = _wide(direction["weight"])
            per_token = per_token + ((a @ g if self.transposed else a @ g.T) * d).sum(1)
        if "bias" in direction:
            per_token = per_token + d @ _wide(direction["bias"])
        return torch.zeros(b, device=a.device, dtype=a.dtype).index_add_(0, row, per_token)

    def grad_sum(self, rec: LayerRecord, rows: Tensor) -> dict[str, Tensor]:
        a, d = self.features(rec)
        a, d = a[rows].reshape(-1, a.shape[-1]), d[rows].reshape(-1, d.shape[-1])
        return {"weight": a.T @ d if self.transposed else d.T @ a, "bias": d.sum(0)}


class EmbeddingHandler(LayerHandler):
    """``y = W[ids]`` (``nn.Embedding``): the gradient of row v of W is the sum of ``d_t`` with ids_t = v.

    Ids shared by all records (GPT-2's position ids, ``Tensor[1, T]``) give an output that the
    model broadcasts over the records; it is expanded to ``rows`` records here so that each record's
    share of the gradient reaches the hook (the expand's backward sums it back, as the broadcast did).
    """

    def capture(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, rows: int | None = None
    ) -> tuple[Any, Tensor] | None:
        got = super().capture(module, args, output, rows)
        if got is None or not rows or rows == 1 or got[1].shape[0] != 1 or got[0].shape[0] != 1:
            return got
        ids, out = got
        return ids.expand(rows, *ids.shape[1:]), out.expand(rows, *out.shape[1:])

    def features(self, rec: LayerRecord) -> tuple[Tensor, Tensor]:
        ids, d = rec.a, rec.d
        ids = ids.reshape(ids.shape[0], -1)
        pad = getattr(rec.module, "padding_idx", None)
        keep = torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad
        return ids, _wide(d.reshape(d.shape[0], -1, d.shape[-1])) * keep.unsqueeze(-1)

    def dots(self, rec: LayerRecord, direction: dict[str, Tensor], skip_weight: bool) -> Tensor:
        ids, d = self.features(rec)
        if "weight" not in direction:
            return torch.zeros(ids.shape[0], device=d.device, dtype=d.dtype)
        return (_wide(direction["weight"])[ids] * d).sum((1, 2))

    def grad_sum(self, rec: LayerRecord, rows: Tensor) -> dict[str, Tensor]:
        ids, d = self.features(rec)
        weight: Tensor = rec.module.weight  # type: ignore[assignment]
        g = torch.zeros(weight.shape, device=d.device, dtype=d.dtype)
        g.index_add_(0, ids[rows].reshape(-1), d[rows].reshape(-1, d.shape[-1]))
        return {"weight": g}


class LayerNormHandler(LayerHandler):
    """``y = xhat * w + b`` over the last dimension (``nn.LayerNorm``); ``a`` is the normalised input."""

    def capture(
        self, module: nn.Module, args: tuple[Any, ...], output: Any, rows: int | None = None
    ) -> tuple[Any, Tensor] | None:
        x = args[0]
        shape = getattr(module, "normalized_shape", ())
        if not isinstance(output, Tensor) or not isinstance(x, Tensor) or len(shape) != 1:
            return None
        xf = _wide(x.detach())
        var, mean = torch.var_mean(xf, dim=-1, keepdim=True, unbiased=False)
        return (xf - mean) * torch.rsqrt(var + getattr(module, "eps", 1e-5)), output

    def dots(self, rec: LayerRecord, direction: dict[str, Tensor], skip_weight: bool) -> Tensor:
        a, d = self.features(rec)
        out = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        if "weight" in direction:
            out = out + (a * d).sum(1) @ _wide(direction["weight"])
        if "bias" in direction:
            out = out + d.sum(1) @ _wide(direction["bias"])
        return out

    def grad_sum(self, rec: LayerRecord, rows: Tensor) -> dict[str, Tensor]:
        a, d = self.features(rec)
        a, d = a[rows], d[rows]
        return {"weight": (a * d).sum((0, 1)), "bias": d.sum((0, 1))}


_HANDLERS: dict[type, LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Embedding: EmbeddingHandler(),
    nn.LayerNorm: LayerNormHandler(),
}


def register_handler(module_type: type, handler: LayerHandler) -> None:
    """Teach :class:`GhostCapture` a layer type (by class; subclasses inherit it)."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise RlattrError(f"module_type: got {module_type!r}; supported: subclasses of torch.nn.Module")
    if not isinstance(handler, LayerHandler):
        raise RlattrError(f"handler: got {type(handler).__name__}; supported: LayerHandler instances")
    _HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The registered handler of ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def live_tokens(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """The tokens whose output gradient is not zero (padding and prompt-only positions drop out).

    ``a``: ``Tensor[B, T, in]``, ``d``: ``Tensor[B, T, out]`` -> ``a``: ``Tensor[L, in]``,
    ``d``: ``Tensor[L, out]``, ``row``: ``Tensor[L]`` (the record of each token) and B.
    """
    b, t = a.shape[0], a.shape[1]
    flat_d = d.reshape(b * t, -1)
    idx = torch.nonzero(flat_d.abs().amax(1) > 0).squeeze(1)
    row = torch.div(idx, t, rounding_mode="floor")
    return a.reshape(b * t, -1)[idx], flat_d[idx], row, b


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or as it is when already float32 / float64 (half precision loses the sums)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


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
