"""Layer handlers for :mod:`rlattr.core.ghost`: how a layer type's parameter gradients follow from ``(a, d)``.

A handler captures what it needs of a layer's input during the forward (``a``) and, given the
output gradient ``d`` of the following backward, gives every record's dot product with a
direction and the gradient of any subset of records. ``nn.Linear``, ``nn.Embedding`` and
``nn.LayerNorm`` are registered here; adapters register others with :func:`register_handler`
(transformers' ``Conv1D`` in ``rlattr.callbacks.trl``) without this module importing them.
"""

from __future__ import annotations

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
