"""Precomputed features and curvature: ``cache_features`` equals ``cache``, ``record_sum`` adds over
shards of the records, and both refuse bad input by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.grads import batch_size, slice_batch
from rlattr.core.methods import GradCos, GradDot, InfluenceFunction, NewtonStep, RescaledInfluence, TracIn
from rlattr.core.methods.base import featurise
from rlattr.core.methods.hessian import CurvatureSpec, ObjectiveHessian
from rlattr.core.methods.trak import TRAK
from rlattr.core.projection import RandomProjection
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, per_record_logits
from tests.core._tda import logreg_closed_form, logreg_problem, mlp_problem


@pytest.fixture(scope="module")
def lr():
    return logreg_problem(n=40, l2=0.05)


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem(n=40, l2=0.05)


def _makers(p) -> dict[str, Any]:
    task, proj = p.task, RandomProjection(p.task.num_params, 7, seed=1)
    later = {k: v + 0.01 for k, v in task.tracked_params().items()}
    curv: dict[str, Any] = {"output": per_record_logits(p.model), "output_loss": ce_of_logits}
    return {
        "graddot": lambda: GradDot(task, projector=proj, chunk_size=8),
        "gradcos": lambda: GradCos(task, chunk_size=8),
        "tracin": lambda: TracIn(task, [task.tracked_params(), later], [0.5, 0.2], chunk_size=8),
        "trak": lambda: TRAK(task, [task.tracked_params(), later], proj_dim=6, chunk_size=8),
        "influence": lambda: InfluenceFunction(task, l2=p.l2, damping=0.05, chunk_size=8),
        "rif": lambda: RescaledInfluence(task, l2=p.l2, chunk_size=8, **curv),
        "newton": lambda: NewtonStep(task, l2=p.l2, chunk_size=8, hessian="gauss_newton", **curv),
    }


def _loop_features(p, params=None) -> torch.Tensor:
    """Per-record loss gradients ``[n, d]`` by a plain autograd loop over the records."""
    values = p.task.resolve_params(params)
    rows = []
    for i in range(batch_size(p.train)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}
        loss = p.task.loss(leaves, slice_batch(p.train, i, i + 1)).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in p.task.tracked_names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["graddot", "gradcos", "tracin", "trak", "influence", "rif", "newton"])
def test_cache_features_equals_cache(lr, kind: str) -> None:
    make = _makers(lr)[kind]
    expected = make().cache(lr.train).attribute(lr.query)
    a = make()
    feats = [featurise(a.task, lr.train, fp, chunk_size=8) for fp in a.feature_passes()]
    assert torch.equal(a.cache_features(lr.train, feats).attribute(lr.query), expected)


def test_featurise_equals_an_autograd_loop(lr) -> None:
    later = {k: v + 0.01 for k, v in lr.task.tracked_params().items()}
    a = _makers(lr)["tracin"]()
    got = [featurise(a.task, lr.train, fp, chunk_size=8) for fp in a.feature_passes()]
    torch.testing.assert_close(got[0], _loop_features(lr), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], _loop_features(lr, later), rtol=1e-10, atol=1e-12)
    proj = RandomProjection(lr.task.num_params, 7, seed=1)
    projected = featurise(lr.task, lr.train, (lr.task, None, proj), chunk_size=8)
    torch.testing.assert_close(
        projected, _loop_features(lr) @ proj.matrix().to(projected), rtol=1e-10, atol=1e-12
    )


def test_cache_features_refuses_bad_features_by_name(lr) -> None:
    a = _makers(lr)["tracin"]()
    good = [featurise(a.task, lr.train, fp, chunk_size=8) for fp in a.feature_passes()]
    n, d = good[0].shape
    with pytest.raises(
        RlattrError, match=r"features: got a Tensor \(40, 27\); supported: a list of 2 Tensor"
    ):
        a.cache_features(lr.train, good[0])
    with pytest.raises(
        RlattrError, match=r"features: got a list of 1; supported: a list of 2 Tensor\[n, k\]"
    ):
        a.cache_features(lr.train, good[:1])
    with pytest.raises(RlattrError, match=rf"features\[1\]: got \(39, {d}\); supported: Tensor\[40, {d}\]"):
        a.cache_features(lr.train, [good[0], good[1][:39]])
    with pytest.raises(
        RlattrError, match=r"features\[0\]: got dtype torch.float32; supported: torch.float64"
    ):
        a.cache_features(lr.train, [good[0].float(), good[1]])
    bad = good[1].clone()
    bad[3, 0], bad[5, 1] = float("nan"), float("inf")
    with pytest.raises(RlattrError, match=r"features\[1\]: got NaN or inf in 2 rows; supported: finite"):
        a.cache_features(lr.train, [good[0], bad])
    with pytest.raises(RlattrError, match=r"curvature: got a Tensor for TracIn, which has no curvature"):
        a.cache_features(lr.train, good, curvature=torch.zeros(d, d, dtype=torch.float64))
    with pytest.raises(
        RlattrError, match=r"curvature: got \(3, 3\) torch.float64; supported: Tensor\[27, 27\]"
    ):
        _makers(lr)["influence"]().cache_features(lr.train, good[:1], curvature=torch.zeros(3, 3).double())
    ek = InfluenceFunction(lr.task, l2=lr.l2, strategy="ekfac")
    with pytest.raises(RlattrError, match=r"curvature: got a precomputed record sum for strategy 'ekfac'"):
        ek.cache_features(lr.train, good[:1], curvature=torch.zeros(d, d, dtype=torch.float64))


def _shard_sum(spec: CurvatureSpec, shard: int, block: int) -> torch.Tensor:
    n = batch_size(spec.batch)
    total = torch.zeros(spec.task.num_params, spec.task.num_params, dtype=torch.float64)
    for lo in range(0, n, shard):
        total += spec.hessian(slice_batch(spec.batch, lo, min(lo + shard, n))).record_sum(block)
    return total


def test_record_sum_is_the_sum_of_hand_hessians_and_adds_over_shards(lr) -> None:
    _, hessians = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    spec = CurvatureSpec(lr.task, lr.train, shift=lr.l2, chunk_size=8)
    whole = spec.hessian().record_sum(block=9)
    np.testing.assert_allclose(whole.numpy(), hessians.sum(0), rtol=1e-10, atol=1e-12)
    # one shard per chunk of the single-process sum (8 records x 256 / 9 columns = 227 records per
    # pass here: so shards of 227 or more): the same additions in the same order
    assert torch.equal(_shard_sum(spec, 40, 9), whole)
    h = spec.hessian().dense(block=9)
    assert torch.equal(spec.hessian().finish_dense(whole), h)
    np.testing.assert_allclose(h.numpy(), hessians.mean(0) + lr.l2 * np.eye(27), rtol=1e-10, atol=1e-12)


def test_sharded_record_sums_match_the_whole_up_to_rounding(mlp) -> None:
    """Hessian passes of 75 columns (all of them) take 4 x 256 // 75 = 13 records: shards of 13 add
    the single process's chunks in its order (equal); shards of 8 split them (rounding). The Gauss-Newton matrix is one product
    over all 40 records in one process, so shards differ by rounding (float64: < 1e-13 relative)."""
    spec = CurvatureSpec(mlp.task, mlp.train, shift=mlp.l2, chunk_size=4)
    whole = spec.hessian().record_sum()
    assert torch.equal(_shard_sum(spec, 13, 256), whole)
    torch.testing.assert_close(_shard_sum(spec, 8, 256), whole, rtol=1e-12, atol=1e-12)
    # 32 columns a pass (75 = 32 + 32 + 11): 4 x 256 // 32 = 32 records for every block, the narrow
    # last one too, so shards of 32 (32 + 8 records) still add up bit for bit
    assert spec.hessian().record_chunk(32) == 32
    assert torch.equal(_shard_sum(spec, 32, 32), spec.hessian().record_sum(block=32))
    gn = CurvatureSpec(
        mlp.task, mlp.train, shift=mlp.l2, output=per_record_logits(mlp.model), output_loss=ce_of_logits
    )
    gn_whole = gn.hessian().record_sum()
    torch.testing.assert_close(_shard_sum(gn, 16, 256), gn_whole, rtol=1e-12, atol=1e-12)
    # upper blocks only until finished: the finished matrix is the dense Gauss-Newton H
    assert torch.equal(gn.hessian().finish_dense(gn_whole), gn.hessian().dense())


@pytest.mark.parametrize("kind", ["influence", "rif", "newton"])
def test_a_precomputed_curvature_gives_the_scores_of_cache(mlp, kind: str) -> None:
    make = _makers(mlp)[kind]
    a = make()
    expected = a.cache(mlp.train).attribute(mlp.query)
    spec = a.curvature_spec(mlp.train)
    total = spec.hessian().record_sum(a.curvature_block)
    feats = [featurise(a.task, mlp.train, fp, chunk_size=8) for fp in a.feature_passes()]
    assert torch.equal(
        make().cache_features(mlp.train, feats, curvature=total).attribute(mlp.query), expected
    )
    halves = _shard_sum(spec, 20, a.curvature_block)
    got = make().cache_features(mlp.train, feats, curvature=halves).attribute(mlp.query)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_given_record_total_serves_every_full_batch_product(mlp) -> None:
    spec = CurvatureSpec(mlp.task, mlp.train, shift=mlp.l2)
    total = spec.hessian().record_sum()
    v = torch.randn(mlp.task.num_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # dense_dim=1 would make products run autograd over the records; the given total is used instead
    op = ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2, dense_dim=1, record_total=total)
    assert torch.equal(op.matvec(v), spec.hessian().dense() @ v)
    torch.testing.assert_close(
        op.matvec(v), ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2, dense_dim=1).matvec(v)
    )
    with pytest.raises(RlattrError, match=r"curvature: got NaN or inf; supported: a finite record_sum"):
        ObjectiveHessian(mlp.task, mlp.train, record_total=total * float("nan"))
