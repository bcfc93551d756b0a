"""The Hessian of a Task's training objective, and the inverse-Hessian solvers that work on it.

The objective is the *mean* per-record loss plus an L2 term, as :mod:`rlattr.testing.supervised`
trains it:

    F(theta) = (1 / N) sum_i l_i(theta) + (l2 / 2) ||theta||^2,   H = (1 / N) sum_i hess l_i + l2 I.

``shift`` below is ``l2 + damping``: the objective's own L2 term plus any numerical damping.
Parameters are handled as one flat vector (d numbers) in the order of ``task.tracked_names``.

Solvers (subclasses of :class:`HessianSolver`, each in its own module) map ``B: Tensor[d, k]`` to
``H^-1 B``: :class:`~rlattr.core.methods.explicit.ExplicitSolver` (dense Hessian, Cholesky),
:class:`~rlattr.core.methods.cg.CGSolver` (conjugate gradient, all columns at once, with its
preconditioner), :class:`~rlattr.core.methods.lissa.LiSSASolver` (the stochastic Neumann-series
recursion of Agarwal et al.) and :class:`~rlattr.core.methods.arnoldi.ArnoldiSolver`. Each is built
from a :class:`CurvatureSpec`; the strategy table that selects one (with EK-FAC) is
:mod:`rlattr.core.methods.solvers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from rlattr.core.grads import batch_size, slice_batch
from rlattr.core.methods.ggn import add_gram_upper, mirror_upper, record_curvature_factors
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError


def damping_remedy(shift: float, low: float) -> str:
    """What to pass when ``H + shift I`` is not positive definite (``low``: its smallest eigenvalue)."""
    if shift == 0:
        return "pass l2= (the objective's L2) or a damping > 0"
    need = shift - low  # the l2 + damping that would lift the smallest eigenvalue to 0
    return (
        f"l2 + damping must exceed {need:.3g} (the Hessian is indefinite or singular there): raise "
        "damping, or pass output= and output_loss= for the positive semi-definite Gauss-Newton matrix"
    )


def l2_shift(task: Task, l2: float | dict[str, float], damping: float) -> float | Tensor:
    """``l2 + damping`` as H's diagonal term: a float, or ``Tensor[d]`` (float64) for per-parameter
    coefficients ``{tracked name: l2}`` (:meth:`Task.l2_coefficients`), in the flat order."""
    if not isinstance(l2, dict):
        return float(l2) + float(damping)
    named = dict(task.model.named_parameters())
    return torch.cat(
        [
            torch.full((named[n].numel(),), l2[n] + float(damping), dtype=torch.float64)
            for n in task.tracked_names
        ]
    )


class ParamLayout:
    """Where each tracked tensor lives in the flat parameter vector."""

    def __init__(self, params: Params, names: list[str]) -> None:
        self.names = list(names)
        self.shapes = {n: params[n].shape for n in names}
        self.slices: dict[str, slice] = {}
        start = 0
        for n in names:
            size = params[n].numel()
            self.slices[n] = slice(start, start + size)
            start += size
        self.dim = start

    def flatten(self, params: Params) -> Tensor:
        """``dict[name, Tensor[*shape]] -> Tensor[d]``."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        """``Tensor[d] -> dict[name, Tensor[*shape]]`` (views of ``vec``)."""
        return {n: vec[self.slices[n]].reshape(self.shapes[n]) for n in self.names}


class ObjectiveHessian:
    """``H = (1 / normalizer) sum_i hess l_i(theta) + shift I`` as a linear operator.

    Args:
        task: the Task; its ``loss`` gives ``l_i``.
        batch: the records the sum runs over.
        params: where H is taken (default: the model's current tracked parameters).
        shift: ``l2 + damping``, added to the diagonal: a float, or ``Tensor[d]`` (per-parameter l2).
        normalizer: the N of the mean (default: the number of records in ``batch``).
        chunk_size: records per Hessian-vector-product pass of 256 vectors (bounds memory; passes
            of fewer vectors take proportionally more records).
        output, output_loss: use the Gauss-Newton matrix (see the module docstring).
        factor_bytes: with ``output``, the Gauss-Newton matrix is kept as its per-record factors
            ``J: Tensor[n, C, d]``, ``A: Tensor[n, C, C]`` (built once; every product is then two
            matrix products) when J fits in this many bytes; otherwise each product re-runs autograd.
        dense_dim: up to this many parameters, full-batch products go through H built once.
        record_total: the :meth:`record_sum` of ``batch``, computed elsewhere (e.g. summed over
            shards of the records): H is finished from it, and every full-batch product goes
            through it, whatever the dimension; the records are then used only by minibatch products.
    """

    def __init__(
        self,
        task: Task,
        batch: Batch,
        *,
        params: Params | None = None,
        shift: float | Tensor = 0.0,
        normalizer: int | None = None,
        chunk_size: int = 1024,
        output: Callable[[Params, Batch], Tensor] | None = None,
        output_loss: Callable[[Tensor, Batch], Tensor] | None = None,
        factor_bytes: int = 1 << 30,
        dense_dim: int = 2048,
        record_total: Tensor | None = None,
    ) -> None:
        if (output is None) != (output_loss is None):
            raise RlattrError("output, output_loss: pass both (Gauss-Newton curvature) or neither (Hessian)")
        self.factor_bytes = factor_bytes
        self._factors: tuple[Tensor, Tensor] | None = None
        self.dense_dim = dense_dim
        self._dense: Tensor | None = None
        self.output, self.output_loss = output, output_loss
        self.task, self.batch = task, batch
        p = task.resolve_params(params)
        self.layout = ParamLayout(p, task.tracked_names)
        self.theta = self.layout.flatten(p)
        # a per-parameter shift is a diagonal Tensor[d]; ``shift`` (for messages) is its smallest entry
        self.shift_diag: Tensor | None = None
        if isinstance(shift, Tensor):
            if shift.shape != (self.dim,):
                raise RlattrError(
                    f"shift: got shape {tuple(shift.shape)}; supported: a float or Tensor[{self.dim}]"
                )
            self.shift_diag = shift.to(self.theta)
            shift = float(shift.min()) if bool(torch.isfinite(shift).all()) else float("nan")
        if not shift >= 0 or not math.isfinite(shift):
            raise RlattrError(f"damping: l2 + damping must be a finite number >= 0, got {shift}")
        self.shift = float(shift)
        self.n = batch_size(batch)
        self.normalizer = self.n if normalizer is None else int(normalizer)
        self.chunk_size = chunk_size
        if record_total is not None:
            self._dense = self.finish_dense(record_total)

    @property
    def dim(self) -> int:
        return self.layout.dim

    def _ggn_chunk(self, chunk: Batch, vs: Tensor) -> Tensor:
        assert self.output is not None and self.output_loss is not None
        out_fn, loss_fn = self.output, self.output_loss

        def outputs(theta: Tensor) -> Tensor:
            return out_fn(self.layout.unflatten(theta), chunk)

        primal = vjp(outputs, self.theta)
        z, pullback = primal[0], primal[1]
        z = z.detach()

        def loss_grad(zz: Tensor) -> Tensor:
            return grad(lambda u: loss_fn(u, chunk).sum())(zz)

        def gvp(v: Tensor) -> Tensor:
            jv = jvp(outputs, (self.theta,), (v,))[1]
            ajv = jvp(loss_grad, (z,), (jv,))[1]
            return pullback(ajv)[0]

        return vmap(gvp)(vs)

    def _hvp_chunk(self, chunk: Batch, vs: Tensor) -> Tensor:
        if self.output is not None:
            return self._ggn_chunk(chunk, vs)

        def total(theta: Tensor) -> Tensor:
            return self.task.loss(self.layout.unflatten(theta), chunk).sum()

        def hvp(v: Tensor) -> Tensor:
            return jvp(grad(total), (self.theta,), (v,))[1]

        return vmap(hvp)(vs)

    def shifted(self, v: Tensor) -> Tensor:
        """``shift * v`` for ``v: Tensor[d]`` or ``Tensor[d, k]`` (the diagonal term of H)."""
        if self.shift_diag is None:
            return self.shift * v
        return self.shift_diag.reshape(-1, *([1] * (v.dim() - 1))) * v

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """The Gauss-Newton factors ``(J: Tensor[n, C, d], A: Tensor[n, C, C])``, built on first use;
        None for the Hessian, above ``dense_dim`` parameters, or when J would exceed ``factor_bytes``."""
        if self.output is None or self.output_loss is None or self.dim > self.dense_dim:
            # beyond dense_dim a factored product (4 n C d flops a column) loses to autograd's
            # (about 6 n d) once C > 1: measured on the digits MLP, 4,810 parameters, C = 10
            return None
        if self._factors is None:
            with torch.no_grad():
                c = self.output(self.layout.unflatten(self.theta), slice_batch(self.batch, 0, 1)).shape[-1]
            if self.n * c * self.dim * self.theta.element_size() > self.factor_bytes:
                return None
            p = self.layout.unflatten(self.theta)
            parts = [
                record_curvature_factors(
                    self.task,
                    self.output,
                    self.output_loss,
                    slice_batch(self.batch, s, min(s + 256, self.n)),
                    p,
                )
                for s in range(0, self.n, 256)
            ]
            self._factors = (torch.cat([j for j, _ in parts]), torch.cat([a for _, a in parts]))
        return self._factors

    def matvec(self, v: Tensor, indices: Tensor | None = None) -> Tensor:
        """``H v`` for ``v: Tensor[d, k]``; with ``indices``, the Hessian of those records only
        (normalised by their count), as LiSSA's minibatches use it.

        With at most ``dense_dim`` parameters the full-batch H is built once (:meth:`dense`) and
        every later product is one ``[d, d] @ [d, k]``: cheaper than re-running the records as soon
        as an iterative solver needs more than ``d`` columns in all.
        """
        if indices is None and (self._dense is not None or self.dim <= self.dense_dim):
            if self._dense is None:
                self._dense = self.dense()
            return self._dense @ v.to(self._dense)
        return self._product(v, indices)

    def _product(self, v: Tensor, indices: Tensor | None) -> Tensor:
        fac = self.factors()
        if fac is not None:  # sum_i J_i^T A_i J_i v: three matrix products, no autograd
            jac, a = fac if indices is None else (fac[0][indices], fac[1][indices])
            v = v.to(self.theta)
            n, c, d = jac.shape
            av = (a @ (jac.reshape(n * c, d) @ v).reshape(n, c, -1)).reshape(n * c, -1)
            norm = self.normalizer if indices is None else n
            return jac.reshape(n * c, d).T @ av / norm + self.shifted(v)
        batch = self.batch
        if indices is not None:
            batch = tree_map(lambda x: x[indices.to(x.device)] if isinstance(x, Tensor) else x, batch)
        vs = v.T.to(self.theta).contiguous()
        norm = self.normalizer if indices is None else batch_size(batch)
        return self._record_columns(v, batch) / norm + self.shifted(vs.T)

    def _record_columns(self, v: Tensor, batch: Batch | None = None, rows: int | None = None) -> Tensor:
        """``sum_i hess l_i v: Tensor[d, k]`` over ``batch`` (default: all records), ``rows``
        records at a time."""
        batch = self.batch if batch is None else batch
        vs = v.T.to(self.theta).contiguous()
        n = batch_size(batch)
        out = torch.zeros_like(vs)
        # records x vectors per pass held at chunk_size x 256: a narrow product (Arnoldi's, LiSSA's)
        # takes more records per pass (one vector on the digits MLP: 28 ms a product, not 70-130 ms)
        rows = max(self.chunk_size, self.chunk_size * 256 // vs.shape[0]) if rows is None else rows
        for start in range(0, n, rows):
            out += self._hvp_chunk(slice_batch(batch, start, min(start + rows, n)), vs)
        return out.T

    def dense(self, block: int = 256) -> Tensor:
        """The whole ``Tensor[d, d]`` (small models only), symmetrised: :meth:`finish_dense` of
        :meth:`record_sum`, or of the sum given as ``record_total``."""
        if self._dense is not None:
            return self._dense
        return self.finish_dense(self.record_sum(block))

    def record_sum(self, block: int = 256) -> Tensor:
        """``Tensor[d, d]``: the sum over this operator's records of their Hessian (Gauss-Newton)
        terms, not normalised, without the shift.

        The Gauss-Newton matrix comes from per-record factors, ``sum_i J_i^T (A_i J_i)`` over chunks
        of records, upper blocks only (:func:`add_gram_upper`; :meth:`finish_dense` mirrors them),
        whenever a chunk's J fits in ``factor_bytes``; otherwise (and for the Hessian) from ``block``
        Hessian-vector products at once, a chunk of records at a time. The record sums of
        consecutive shards of the records add up (in shard order, from zeros) to the whole batch's:
        bit for bit when every shard is one of these chunks, else up to rounding.
        """
        d = self.dim
        if self._gram_chunk() > 0:
            rows = self._gram_chunk()
            h = torch.zeros(d, d, dtype=self.theta.dtype, device=self.theta.device)
            for s in range(0, self.n, rows):
                jac, a = self._chunk_factors(s, min(s + rows, self.n))
                add_gram_upper(h, jac.reshape(-1, d), (a @ jac).reshape(-1, d))
            return h
        eye = torch.eye(d, dtype=self.theta.dtype, device=self.theta.device)
        rows = self.record_chunk(block)  # the same records per pass for every block, a narrower last one too
        return torch.cat(
            [self._record_columns(eye[:, s : s + block], rows=rows) for s in range(0, d, block)], dim=1
        )

    def record_chunk(self, block: int = 256) -> int:
        """Records per autograd pass of :meth:`record_sum` with ``block`` columns: shards of the
        records of this size (the last may be shorter) add up to the whole sum bit for bit."""
        return max(self.chunk_size, self.chunk_size * 256 // min(block, self.dim))

    def finish_dense(self, total: Tensor) -> Tensor:
        """``H: Tensor[d, d]`` from a :meth:`record_sum` of all the records (or a sum of shards'):
        divided by the normaliser, the shift added, made exactly symmetric."""
        d = self.dim
        if tuple(total.shape) != (d, d) or total.dtype != self.theta.dtype:
            raise RlattrError(
                f"curvature: got {tuple(total.shape)} {total.dtype}; supported: Tensor[{d}, {d}] of "
                f"{self.theta.dtype}, a record_sum"
            )
        if not bool(torch.isfinite(total).all()):
            raise RlattrError("curvature: got NaN or inf; supported: a finite record_sum")
        total = total.to(self.theta.device)
        eye = torch.ones(d, dtype=total.dtype, device=total.device)
        if self._record_bytes() <= self.factor_bytes:  # record_sum's upper blocks of factors
            h = mirror_upper(total.clone()).div_(self.normalizer)
            h.diagonal().add_(self.shifted(eye))
            return h
        h = total / self.normalizer + self.shifted(torch.diag(eye))
        return 0.5 * (h + h.T)

    def _record_bytes(self) -> float:
        """Bytes of one record's Gauss-Newton factor J (inf for the Hessian: no factors)."""
        if self.output is None:
            return float("inf")
        with torch.no_grad():
            c = self.output(self.layout.unflatten(self.theta), slice_batch(self.batch, 0, 1)).shape[-1]
        return c * self.dim * self.theta.element_size()

    def _gram_chunk(self) -> int:
        """Records per chunk for the dense Gauss-Newton matrix from factors (0: not from factors)."""
        per_record = self._record_bytes()
        if per_record > self.factor_bytes:
            return 0
        if self._factors is not None or self.factors() is not None:
            return self.n
        return int(min(256, self.factor_bytes // per_record, self.n))

    def _chunk_factors(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        if self._factors is not None:
            return self._factors[0][start:stop], self._factors[1][start:stop]
        assert self.output is not None and self.output_loss is not None
        chunk = slice_batch(self.batch, start, stop)
        return record_curvature_factors(
            self.task, self.output, self.output_loss, chunk, self.layout.unflatten(self.theta)
        )

    def max_eigenvalue(self, iters: int = 30, seed: int = 0) -> float:
        """Power-iteration estimate of the largest eigenvalue of H."""
        # one CPU float64 stream: the same start vector for any dtype and device
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.dim, 1, generator=gen, dtype=torch.float64, device="cpu").to(self.theta)
        lam = 0.0
        for _ in range(iters):
            w = self.matvec(v / v.norm())
            lam = float((v / v.norm()).T @ w)
            v = w
        return abs(lam)


@dataclass(frozen=True)
class CurvatureSpec:
    """What every inverse-curvature solver is built from.

    Args:
        task: the Task; its loss gives the Hessian (and EK-FAC's default Fisher).
        batch: the records the curvature is estimated on.
        shift: ``l2 + damping``, added to the curvature's diagonal (``Tensor[d]``: per parameter).
        chunk_size: records per Hessian-vector-product (or EK-FAC) pass.
        output, output_loss: ``(params, batch) -> Tensor[n, C]`` and ``(z, batch) -> Tensor[n]``:
            the Gauss-Newton matrix instead of the Hessian (None, None: the Hessian).
        record_total: the curvature's :meth:`ObjectiveHessian.record_sum` over ``batch``, computed
            elsewhere (shards); None: computed from ``batch``. Solvers of the dense matrix only.
    """

    task: Task
    batch: Batch
    shift: float | Tensor = 0.0
    chunk_size: int = 256
    output: Callable[[Params, Batch], Tensor] | None = None
    output_loss: Callable[[Tensor, Batch], Tensor] | None = None
    record_total: Tensor | None = None

    def hessian(self, batch: Batch | None = None) -> ObjectiveHessian:
        """The spec's curvature as an :class:`ObjectiveHessian` operator (on ``batch`` instead of
        the spec's records when given: a shard's, whose :meth:`~ObjectiveHessian.record_sum` is
        the shard's part of the total)."""
        return ObjectiveHessian(
            self.task,
            self.batch if batch is None else batch,
            shift=self.shift,
            chunk_size=self.chunk_size,
            output=self.output,
            output_loss=self.output_loss,
            record_total=self.record_total if batch is None else None,
        )


class HessianSolver:
    """Base of the solvers that work on an :class:`ObjectiveHessian` (Hessian or Gauss-Newton)."""

    gauss_newton: ClassVar[bool] = True  # honours CurvatureSpec.output / output_loss
    per_parameter_shift: ClassVar[bool] = True  # honours a Tensor[d] CurvatureSpec.shift
    record_total: ClassVar[bool] = True  # honours a precomputed CurvatureSpec.record_total

    def __init__(self, hessian: ObjectiveHessian) -> None:
        self.h = hessian

    @classmethod
    def from_spec(cls, spec: CurvatureSpec, **options: Any) -> Self:
        """The solver on ``spec``'s curvature; ``options`` are the constructor's keyword-only ones."""
        return cls(spec.hessian(), **options)

    def solve(self, b: Tensor) -> Tensor:
        """``H^-1 b`` for ``b: Tensor[d, k]``, in the Hessian's dtype and device."""
        raise NotImplementedError
