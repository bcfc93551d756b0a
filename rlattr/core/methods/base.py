"""The cache / attribute split shared by every attributor.

``cache(train)`` featurises the training records once; ``attribute(query)`` scores any number of
queries against them and returns ``Tensor[m, n]`` (queries x training records). One sign
convention: a positive score means the training record *helps* the query (a gradient step on it
lowers the query's loss, or raises a target to raise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Self

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from rlattr.core.grads import batch_size, flatten, iter_per_record_grads, target_grads
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError


def query_grads(task: Task, query: Batch, *, params: Params | None = None, chunk_size: int = 128) -> Tensor:
    """Query gradients as ``Tensor[m, d]``, signed as ``g_q`` (the gradient of a loss to lower).

    With a Task target, the m components of ``target(params, query)``; without one, the training
    loss of each query record (the usual supervised query: a test example's loss).
    """
    if task.target is not None:
        return task.target_sign() * flatten(target_grads(task, query, params=params), task.tracked_names)
    parts = [
        flatten(g, task.tracked_names)
        for _, _, g in iter_per_record_grads(task, query, params=params, chunk_size=chunk_size)
    ]
    return torch.cat(parts)


def group_masks(task: Task, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``Tensor[G, d]`` of 0/1: which flat parameter coordinates belong to each group."""
    named = dict(task.model.named_parameters())
    sizes = [named[n].numel() for n in task.tracked_names]
    groups = task.group_names
    masks = torch.zeros(len(groups), sum(sizes), dtype=dtype, device=device)
    start = 0
    for name, size in zip(task.tracked_names, sizes, strict=True):
        masks[groups.index(task.group_of[name]), start : start + size] = 1.0
        start += size
    return masks


FeaturePass = tuple[Task, Params | None, RandomProjection | None]
"""One per-record featurisation pass of an attributor's ``cache``: the Task whose per-record loss
is differentiated, the parameters it is differentiated at (None: the model's current ones) and the
projection applied to the flat gradients (None: none)."""


def featurise(task: Task, batch: Batch, feature_pass: FeaturePass, *, chunk_size: int = 128) -> Tensor:
    """``Tensor[n, k]``: the pass's per-record gradients on ``batch``, flattened in the order of
    ``task.tracked_names``, then projected (k = the projection's ``dim_out``, or d without one)."""
    ftask, params, proj = feature_pass
    rows = []
    for _, _, g in iter_per_record_grads(ftask, batch, params=params, chunk_size=chunk_size):
        flat = flatten(g, task.tracked_names)
        rows.append(proj.project(flat) if proj is not None else flat)
    return torch.cat(rows)


def check_features(features: Sequence[Tensor], passes: list[FeaturePass], n: int) -> list[Tensor]:
    """``features`` as a list after checking it holds, for each pass, a finite ``Tensor[n, k]`` of
    the dtype the pass's parameters have; raises an RlattrError naming ``features`` otherwise."""
    if isinstance(features, Tensor) or not isinstance(features, Sequence) or len(features) != len(passes):
        got = (
            f"a Tensor {tuple(features.shape)}"
            if isinstance(features, Tensor)
            else f"a {type(features).__name__} of {len(features)}"
            if isinstance(features, Sequence)
            else type(features).__name__
        )
        raise RlattrError(
            f"features: got {got}; supported: a list of {len(passes)} Tensor[n, k], one per featurisation pass"
        )
    for c, (feats, (task, params, proj)) in enumerate(zip(features, passes, strict=True)):
        k = proj.dim_out if proj is not None else task.num_params
        dtype = task.resolve_params(params)[task.tracked_names[0]].dtype
        if not isinstance(feats, Tensor) or tuple(feats.shape) != (n, k):
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise RlattrError(
                f"features[{c}]: got {shape}; supported: Tensor[{n}, {k}] (one row per training record)"
            )
        if feats.dtype != dtype:
            raise RlattrError(f"features[{c}]: got dtype {feats.dtype}; supported: {dtype}, the parameters'")
        bad = int((~torch.isfinite(feats)).any(1).sum())
        if bad:
            raise RlattrError(f"features[{c}]: got NaN or inf in {bad} rows; supported: finite features")
    return list(features)


Signature = tuple[object, list[tuple[tuple[int, ...], torch.dtype] | None]]


def batch_signature(batch: Batch) -> Signature:
    """The structure of a batch without its record count: tree spec and per-leaf trailing shape."""
    leaves, spec = tree_flatten(batch)
    return spec, [(tuple(x.shape[1:]), x.dtype) if isinstance(x, Tensor) else None for x in leaves]


def check_query(task: Task, query: Batch, expected: Signature | None) -> None:
    """Raise an RlattrError naming ``query`` unless the Task can score it.

    With a target, the query is the target's input: it must hold tensors, and the target must
    evaluate on it (at the current parameters) to a scalar or ``Tensor[m]``. Without one, the query
    records are scored by the training loss, so they must be structured like the training records,
    whose :func:`batch_signature` is ``expected`` (None: nothing cached yet, nothing to compare).
    """
    if task.target is not None:
        _check_target_query(task, query)
        return
    if expected is None:
        return
    spec, leaves = batch_signature(query)
    if spec != expected[0]:
        raise RlattrError(
            f"query: got a batch structured as {spec}; supported: the training records' {expected[0]}"
        )
    for j, (got, want) in enumerate(zip(leaves, expected[1], strict=False)):
        if got is not None and want is not None and got[0] != want[0]:
            raise RlattrError(
                f"query: got per-record shape {got[0]} in leaf {j}; supported: the training records' {want[0]}"
            )


def _check_target_query(task: Task, query: Batch) -> None:
    target = task.require_target()
    if not any(isinstance(x, Tensor) for x in tree_flatten(query)[0]):
        raise RlattrError(
            f"query: got {type(query).__name__} holding no tensor; supported: the target's input batch"
        )
    try:
        with torch.no_grad():
            out = target(task.tracked_params(), query)
    except RlattrError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise RlattrError(
            f"query: the Task's target fails on it ({type(err).__name__}: {str(err)[:200]}); "
            "supported: the batch the target takes"
        ) from err
    if not isinstance(out, Tensor) or out.dim() > 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RlattrError(f"query: the Task's target returns {shape} on it; supported: a scalar or Tensor[m]")


class Attributor(ABC):
    """Base class: featurise training records once, score many queries.

    The attributors whose ``cache`` featurises per-record gradients (:meth:`feature_passes`) also
    take those features precomputed (:meth:`cache_features`, e.g. from shards computed elsewhere:
    :func:`rlattr.scale.sharded_cache`); the attributors built on a dense curvature also take its
    sum over the records (``accepts_curvature``).
    """

    accepts_curvature: ClassVar[bool] = False

    def __init__(self, task: Task, *, chunk_size: int = 128) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task: expected rlattr.core.Task, got {type(task).__name__}")
        self.task = task
        self.chunk_size = chunk_size
        self._train: Tensor | None = None
        self._signature: Signature | None = None

    @abstractmethod
    def cache(self, train: Batch) -> Attributor:
        """Featurise the training records; returns self."""

    @abstractmethod
    def attribute(self, query: Batch) -> Tensor:
        """Scores ``Tensor[m, n]`` of every query against every cached training record."""

    def check_query(self, query: Batch) -> None:
        """Raise an RlattrError naming ``query`` unless this attributor can score it (see :func:`check_query`)."""
        check_query(self.task, query, self._signature)

    def _require_cache(self) -> Tensor:
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.attribute: call cache(train) first")
        return self._train

    def query_vectors(self, query: Batch) -> list[Tensor]:
        """The query side before any kernel: one ``Tensor[m, d]`` per model / checkpoint.

        Together with :meth:`score_vectors` (linear in these vectors) this lets a score be split
        into per-parameter-group contributions (:meth:`attribute_by_group`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not split its scores by parameter group")

    def score_vectors(self, vectors: list[Tensor]) -> Tensor:
        """Scores ``Tensor[m, n]`` of query vectors (as returned by :meth:`query_vectors`)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its scores by parameter group")

    def attribute_by_group(self, query: Batch) -> Tensor:
        """Per-group contributions ``Tensor[m, n, G]`` (groups of ``task.group_names``).

        Column g scores the query vectors restricted to group g's parameters; the columns sum to
        :meth:`attribute`.
        """
        vectors = self.query_vectors(query)
        cols = []
        for mask in group_masks(self.task, dtype=vectors[0].dtype, device=vectors[0].device):
            cols.append(self.score_vectors([v * mask for v in vectors]))
        return torch.stack(cols, dim=-1)

    def feature_passes(self) -> list[FeaturePass]:
        """The featurisation passes of ``cache``, in order: pass c gives the c-th features of
        :meth:`cache_features` (:func:`featurise` computes them)."""
        raise RlattrError(
            f"attributor: got {type(self).__name__}, which takes no precomputed features; supported: "
            "GradDot, GradCos, TracIn, TRAK, InfluenceFunction, RescaledInfluence, NewtonStep"
        )

    def cache_features(
        self, train: Batch, features: Sequence[Tensor], *, curvature: Tensor | None = None
    ) -> Self:
        """``cache(train)`` with precomputed features: the same state, so the same scores.

        Args:
            train: the training records (for the query check and, where the method needs them,
                the curvature or output weights).
            features: ``[Tensor[n, k_c]]``, one per pass of :meth:`feature_passes`, as
                :func:`featurise` computes them (finite, in the parameters' dtype).
            curvature: for attributors with ``accepts_curvature``: the sum over the curvature's
                records of their Hessian (Gauss-Newton) terms, ``Tensor[d, d]``, as
                :meth:`rlattr.core.methods.hessian.ObjectiveHessian.record_sum` computes it (summed over
                shards in order); None: computed here from the records.
        """
        passes = self.feature_passes()
        feats = check_features(features, passes, batch_size(train))
        if curvature is not None and not self.accepts_curvature:
            raise RlattrError(
                f"curvature: got a Tensor for {type(self).__name__}, which has no curvature; supported: None"
            )
        self._signature = batch_signature(train)
        self._cache_features(train, feats, curvature)
        return self

    def _cache_passes(self, train: Batch) -> Self:
        """``cache`` of the attributors with :meth:`feature_passes`: featurise, then cache from features."""
        self._signature = batch_signature(train)
        feats = [featurise(self.task, train, p, chunk_size=self.chunk_size) for p in self.feature_passes()]
        self._cache_features(train, feats, None)
        return self

    def _cache_features(self, train: Batch, features: list[Tensor], curvature: Tensor | None) -> None:
        raise NotImplementedError
