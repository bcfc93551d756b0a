"""Distilled attribution embeddings: a slow teacher's rankings in a fast embedding space.

A teacher attributor scores a sample of fit queries against the training records once. Two small
encoders, one for records and one for queries, both on caller-given features, are fitted so that
the student score ``e_q(q) . e_r(i)`` ranks the records like the teacher does (a listwise ranking
loss, ListNet: cross-entropy between ``softmax(z(teacher) / T)`` and ``softmax(z(student) / T)`` over the
records of each query, ``z`` the per-query standardisation, plus a small squared error on the
standardised scores that fixes the scale). New queries are then answered without the teacher:
encode the query, take dot products with the index of record embeddings.

``solver="ridge"`` fits linear encoders in closed form instead, for the common case where the
teacher is linear in the query features (every gradient method is: ``g_q^T K g_i`` with ``g_q`` the
query's gradient features): ridge regression of the teacher's scores on the query features (rows
weighted by ``1 / std`` of each query's scores, so every query counts alike), then reduced-rank
regression to ``dim`` (the top right singular vectors of the fitted score matrix become the record
embeddings: the rank-``dim`` student closest to the fit on the fit queries), then a least-squares
record encoder that maps record features to those embeddings. With at least as many fit queries
as the features' span (synthetic queries are cheap: every label of an image, perturbed images) the
held-out recall is limited only by ``dim``. Optional ListNet steps then fine-tune the ranking.

Index: exact search (one matrix product and ``torch.topk``). At this library's sizes (up to about
10^6 records x 64 dimensions) that is milliseconds per query, returns the true top k (no recall lost
to the index), and needs no extra dependency; an approximate library pays off only beyond that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from rlattr.core.grads import batch_size, flatten, iter_per_record_grads
from rlattr.core.methods.base import Attributor, batch_signature, query_grads
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Task
from rlattr.errors import RlattrError

Features = Callable[[Batch], Tensor]
Solver = Literal["listnet", "ridge"]
SOLVERS = ("listnet", "ridge")


def gradient_features(
    task: Task, *, proj_dim: int | None = None, seed: int = 0, query: bool = False, chunk_size: int = 128
) -> Features:
    """``batch -> Tensor[n, d]`` (or ``[n, proj_dim]``): each record's loss gradient, optionally projected.

    ``query=True`` takes the query side of the gradient methods instead (:func:`query_grads`: the
    Task's target gradients when it has a target, else each query record's loss gradient). One
    seeded Gaussian projection is shared by every call, so records and queries land in one space.
    """
    if proj_dim is not None and proj_dim < 1:
        raise RlattrError(f"proj_dim: got {proj_dim}; supported: None (no projection) or >= 1")
    proj = RandomProjection(task.num_params, proj_dim, seed=seed) if proj_dim is not None else None

    def features(batch: Batch) -> Tensor:
        if query:
            flat = query_grads(task, batch, chunk_size=chunk_size)
        else:
            rows = iter_per_record_grads(task, batch, chunk_size=chunk_size)
            flat = torch.cat([flatten(g, task.tracked_names) for _, _, g in rows])
        return (proj.project(flat) if proj is not None else flat).detach()

    return features


def ridge_solve(x: Tensor, y: Tensor, ridge: float) -> Tensor:
    """``argmin_W ||x W - y||^2 + lam ||W||^2`` for ``x: Tensor[N, f]``, ``y: Tensor[N, o]``: ``Tensor[f, o]``.

    ``lam = ridge * mean(diag(x^T x))`` (scale-free); primal form when N >= f, dual when N < f
    (then ``ridge = 0`` gives the minimum-norm interpolant where x has full row rank).
    """
    if x.shape[0] >= x.shape[1]:
        gram = x.T @ x
        gram.diagonal().add_(ridge * gram.diagonal().mean() + 1e-12)
        return torch.linalg.solve(gram, x.T @ y)
    gram = x @ x.T
    gram.diagonal().add_(ridge * gram.diagonal().mean() + 1e-12)
    return x.T @ torch.linalg.solve(gram, y)


def reduced_rank_fit(
    fq: Tensor, teacher: Tensor, fr: Tensor, dim: int, ridge: float
) -> tuple[Tensor, Tensor]:
    """Closed-form linear encoders ``(Q: Tensor[f_q, d], R: Tensor[f_r, d])`` with ``fq Q (fr R)^T ~ teacher``.

    ``fq: Tensor[N, f_q]`` fit-query features, ``teacher: Tensor[N, n]`` scores, ``fr: Tensor[n, f_r]``
    record features; ``d = min(dim, n, N)``. See the module docstring for the three steps.
    """
    w = 1.0 / teacher.std(1, keepdim=True).clamp_min(1e-30)  # every query's scores on one scale
    x, y = fq * w, teacher * w
    full = ridge_solve(x, y, ridge)  # [f_q, n]: query features -> score of each record
    d = min(dim, *teacher.shape)
    basis = torch.linalg.svd(x @ full, full_matrices=False).Vh[:d].T  # [n, d], orthonormal columns
    return full @ basis, ridge_solve(fr, basis, 1e-10)


def factor_query_map(
    q_map: Tensor, shapes: Sequence[tuple[int, int]], rank: int
) -> list[tuple[Tensor, Tensor]]:
    """Per-layer low-rank factors of a linear query map ``q_map: Tensor[P, d]`` on gradient features.

    The rows of ``q_map`` follow the features' layout: layer l's gradient ``delta_l (x) a_l``
    flattened row-major (``out_l x in_l``, ``shapes[l] = (out_l, in_l)``), layer after layer. For
    every layer and embedding dimension k the ``out_l x in_l`` slice of column k is replaced by its
    best rank-``rank`` approximation (SVD). Returns per layer ``(U: Tensor[out_l, d, r], V:
    Tensor[in_l, d, r])``, singular values folded into U; exact once ``rank >= min(out_l, in_l)``.
    """
    if rank < 1:
        raise RlattrError(f"rank: got {rank}; supported: >= 1")
    sizes = [o * i for o, i in shapes]
    if q_map.dim() != 2 or sum(sizes) != q_map.shape[0]:
        raise RlattrError(
            f"shapes: cover {sum(sizes)} rows; supported: the rows of q_map {tuple(q_map.shape)}"
        )
    d, factors = q_map.shape[1], []
    for (o, i), block in zip(shapes, q_map.split(sizes), strict=True):
        u, sv, vh = torch.linalg.svd(block.reshape(o, i, d).permute(2, 0, 1), full_matrices=False)
        r = min(rank, sv.shape[1])
        left = (u[:, :, :r] * sv[:, None, :r]).permute(1, 0, 2).contiguous()  # [o, d, r]
        factors.append((left, vh[:, :r, :].permute(2, 0, 1).contiguous()))  # [i, d, r]
    return factors


def factored_embed(
    parts: Sequence[tuple[Tensor, Tensor]], factors: Sequence[tuple[Tensor, Tensor]]
) -> Tensor:
    """``Tensor[m, d]``: the factored query map applied to per-layer pairs ``(delta_l: Tensor[m, out_l],
    a_l: Tensor[m, in_l])``, i.e. ``sum_l sum_r (delta_l . U_l[:, k, r]) (a_l . V_l[:, k, r])``,
    without forming the ``sum_l out_l in_l`` gradient features (cost ``sum_l (out_l + in_l) d r``)."""
    if len(parts) != len(factors) or not parts:
        raise RlattrError(f"parts: got {len(parts)} layers; supported: one per factor ({len(factors)})")
    total: Tensor | None = None
    for (delta, a), (left, right) in zip(parts, factors, strict=True):
        o, d, r = left.shape
        e = ((delta @ left.reshape(o, d * r)) * (a @ right.reshape(right.shape[0], d * r))).reshape(-1, d, r)
        total = e.sum(-1) if total is None else total + e.sum(-1)
    assert total is not None
    return total


def make_encoder(n_in: int, hidden: int, dim: int, dtype: torch.dtype) -> nn.Module:
    """``hidden == 0``: one Linear map ``n_in -> dim``; else Linear-Tanh-Linear."""
    if hidden == 0:
        return nn.Linear(n_in, dim).to(dtype)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)


def standardize(x: Tensor, dim: int = -1) -> Tensor:
    """``(x - mean) / std`` along ``dim`` (std floored, so constant rows map to 0)."""
    return (x - x.mean(dim, keepdim=True)) / x.std(dim, keepdim=True).clamp_min(1e-12)


def listnet_loss(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Mean over rows of ``CE(softmax(z(target) / T), softmax(z(pred) / T))``; rows are the lists.

    Both sides standardised per row, so the minimiser is ``z(pred) = z(target)`` whatever the
    scale of either (the cross-entropy is minimal where the two distributions agree).
    """
    p = torch.softmax(standardize(target) / temperature, dim=-1)
    return -(p * torch.log_softmax(standardize(pred) / temperature, dim=-1)).sum(-1).mean()


def encode_features(features: Features, batch: Batch, what: str) -> Tensor:
    """``features(batch)`` checked to be ``Tensor[n, f]`` with one row per record of ``batch``."""
    out = features(batch)
    n = batch_size(batch)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RlattrError(f"{what}: returned {shape} for {n} records; supported: Tensor[n, f]")
    if not out.is_floating_point():
        raise RlattrError(f"{what}: returned dtype {out.dtype}; supported: a floating-point Tensor[n, f]")
    return out.detach()


def recall_at_k(student: Tensor, teacher: Tensor, k: int) -> float:
    """Mean over queries of ``|top_k(student) & top_k(teacher)| / k`` for ``Tensor[m, n]`` scores."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise RlattrError(
            f"student: got shape {tuple(student.shape)}; supported: the teacher's [m, n] {tuple(teacher.shape)}"
        )
    if not 1 <= k <= student.shape[1]:
        raise RlattrError(f"k: got {k}; supported: 1 <= k <= {student.shape[1]}")
    s = torch.zeros_like(student, dtype=torch.bool).scatter_(1, student.topk(k, dim=1).indices, True)
    t = torch.zeros_like(teacher, dtype=torch.bool).scatter_(1, teacher.topk(k, dim=1).indices, True)
    return float((s & t).sum(1).double().mean() / k)


def _linear(weight: Tensor) -> nn.Linear:
    """``nn.Linear`` computing ``x @ weight`` (``weight: Tensor[f, d]``), no bias."""
    layer = nn.Linear(weight.shape[0], weight.shape[1], bias=False).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.T)
    return layer


def check_fit_options(dim: int, hidden: int, steps: int, lr: float, temperature: float) -> None:
    if dim < 1 or hidden < 0 or steps < 1:
        raise RlattrError(f"dim, hidden, steps: got {dim}, {hidden}, {steps}; supported: >= 1, >= 0, >= 1")
    if not lr > 0 or not temperature > 0:
        raise RlattrError(f"lr, temperature: got {lr}, {temperature}; supported: both > 0")


class DistilledEmbedding(Attributor):
    """Record and query embeddings fitted to a teacher's scores; exact top-k search over records.

    Args:
        teacher: any attributor (cached here on the same training records if it is not yet).
        features: ``batch -> Tensor[n, f]``, the input of the record encoder.
        query_features: the input of the query encoder (default: ``features``).
        dim: embedding dimension; hidden: hidden width of each encoder (0: linear encoders;
            default 64 for ``"listnet"``, 0 for ``"ridge"``, which needs linear encoders).
        solver: ``"listnet"`` (Adam on the ranking loss from a random start) or ``"ridge"``
            (closed-form reduced-rank regression, then ``steps`` ListNet steps, default 0).
        ridge: relative ridge of the closed-form fit.
        steps, lr: full-batch Adam steps and learning rate; temperature: T of the ranking loss.
        mse_weight: weight of the squared error on standardised scores; seed: initialisation.
    """

    def __init__(
        self,
        teacher: Attributor,
        features: Features,
        *,
        query_features: Features | None = None,
        dim: int = 32,
        hidden: int | None = None,
        solver: Solver = "listnet",
        ridge: float = 1e-6,
        steps: int | None = None,
        lr: float = 1e-2,
        temperature: float = 0.3,
        mse_weight: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not isinstance(teacher, Attributor):
            raise RlattrError(f"teacher: got {type(teacher).__name__}; supported: an Attributor")
        if not callable(features) or (query_features is not None and not callable(query_features)):
            raise RlattrError("features, query_features: supported: callables batch -> Tensor[n, f]")
        if solver not in SOLVERS:
            raise RlattrError(f"solver: got {solver!r}; supported: {SOLVERS}")
        ridged = solver == "ridge"
        hidden = (0 if ridged else 64) if hidden is None else hidden
        steps = (0 if ridged else 500) if steps is None else steps
        if ridged and hidden != 0:
            raise RlattrError(f"hidden: got {hidden} with solver='ridge'; supported: 0 (linear encoders)")
        check_fit_options(dim, hidden, max(steps, 1) if ridged else steps, lr, temperature)
        if mse_weight < 0 or not ridge >= 0:
            raise RlattrError(f"mse_weight, ridge: got {mse_weight}, {ridge}; supported: both >= 0")
        self.solver, self.ridge = solver, ridge
        super().__init__(teacher.task, chunk_size=teacher.chunk_size)
        self.teacher, self.features = teacher, features
        self.query_features = query_features or features
        self.dim, self.hidden, self.steps, self.lr = dim, hidden, steps, lr
        self.temperature, self.mse_weight, self.seed = temperature, mse_weight, seed
        self.record_encoder: nn.Module | None = None
        self.query_encoder: nn.Module | None = None
        self._feats: Tensor | None = None
        self.history: list[float] = []

    def cache(self, train: Batch) -> DistilledEmbedding:
        if self.teacher._train is None:
            self.teacher.cache(train)
        self._signature = batch_signature(train)
        self._feats = encode_features(self.features, train, "features")
        return self

    def fit(self, queries: Batch) -> DistilledEmbedding:
        """Fit both encoders to ``teacher.attribute(queries)``; then build the record index."""
        if self._feats is None:
            raise RuntimeError("DistilledEmbedding.fit: call cache(train) first")
        teacher = self.teacher.attribute(queries).detach().to(self._feats.dtype)
        fq = encode_features(self.query_features, queries, "query_features").to(self._feats.dtype)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            rec = make_encoder(self._feats.shape[1], self.hidden, self.dim, self._feats.dtype)
            qry = make_encoder(fq.shape[1], self.hidden, self.dim, self._feats.dtype)
        if self.solver == "ridge":
            q_map, r_map = reduced_rank_fit(fq, teacher, self._feats, self.dim, self.ridge)
            rec, qry = _linear(r_map), _linear(q_map)
        opt = torch.optim.Adam([*rec.parameters(), *qry.parameters()], lr=self.lr)
        target = standardize(teacher)
        self.history = []
        for _ in range(self.steps):
            opt.zero_grad()
            pred = qry(fq) @ rec(self._feats).T
            loss = listnet_loss(pred, teacher, self.temperature)
            loss = loss + self.mse_weight * (standardize(pred) - target).pow(2).mean()
            loss.backward()
            opt.step()
            self.history.append(float(loss.detach()))
        self.record_encoder, self.query_encoder = rec, qry
        with torch.no_grad():
            self._train = rec(self._feats)  # the index: Tensor[n, dim]
        return self

    def _index(self) -> Tensor:
        if self._train is None or self.query_encoder is None:
            raise RuntimeError("DistilledEmbedding: call cache(train) and fit(queries) first")
        return self._train

    def astype(self, dtype: torch.dtype) -> DistilledEmbedding:
        """Serve in ``dtype`` (e.g. fit in float64, answer queries in float32: several times faster)."""
        self._index()
        assert self.query_encoder is not None and self.record_encoder is not None and self._train is not None
        self.query_encoder, self.record_encoder = self.query_encoder.to(dtype), self.record_encoder.to(dtype)
        self._train = self._train.to(dtype)
        return self

    def embed_queries(self, query: Batch) -> Tensor:
        """``Tensor[m, dim]``: the query embeddings."""
        index = self._index()
        assert self.query_encoder is not None
        with torch.no_grad():
            return self.query_encoder(encode_features(self.query_features, query, "query_features").to(index))

    def attribute(self, query: Batch) -> Tensor:
        index = self._index()
        return self.embed_queries(query) @ index.T

    def search(self, query: Batch, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-k: ``(scores, record indices)``, each ``Tensor[m, k]``, best first."""
        index = self._index()
        if not 1 <= k <= index.shape[0]:
            raise RlattrError(f"k: got {k}; supported: 1 <= k <= {index.shape[0]} (the indexed records)")
        out = (self.embed_queries(query) @ index.T).topk(k, dim=1)
        return out.values, out.indices


__all__ = [
    "DistilledEmbedding",
    "Features",
    "gradient_features",
    "reduced_rank_fit",
    "ridge_solve",
    "encode_features",
    "factor_query_map",
    "factored_embed",
    "listnet_loss",
    "make_encoder",
    "recall_at_k",
    "standardize",
]
