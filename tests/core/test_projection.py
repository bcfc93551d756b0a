"""Random projections: JL inner-product preservation, determinism across processes, shapes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlattr.core import RandomProjection
from rlattr.core.projection import ProjectionKind


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_inner_products_within_jl_bound(kind: ProjectionKind) -> None:
    torch.manual_seed(0)
    d, k, n = 3000, 1024, 12
    x = torch.randn(n, d, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    proj = RandomProjection(d, k, kind, seed=7, block_rows=700)  # several blocks, a ragged last one
    y = proj.project(x)
    exact, approx = x @ x.T, y @ y.T
    # JL: for unit vectors, |<Pa, Pb> - <a, b>| <= eps with eps ~ c sqrt(log(n^2) / k); c = 4 is generous
    eps = 4 * math.sqrt(math.log(n * n) / k)
    assert (approx - exact).abs().max() < eps
    # and the estimate is not vacuous: the error is much smaller than the unit norms
    assert (approx.diagonal() - 1).abs().max() < 0.25


def test_blocks_compose_to_the_matrix_and_project_is_a_matmul() -> None:
    proj = RandomProjection(250, 16, "sparse", seed=3, block_rows=64)
    mat = proj.matrix()
    assert mat.shape == (250, 16)
    x = torch.randn(5, 250)
    torch.testing.assert_close(proj.project(x), x @ mat, rtol=1e-5, atol=1e-5)
    nz = (mat != 0).float().mean().item()
    assert abs(nz - 1 / 3) < 0.05


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_second_moment_is_the_identity(kind: ProjectionKind) -> None:
    mat = RandomProjection(200, 4000, kind, seed=1).matrix().double()
    torch.testing.assert_close(mat @ mat.T, torch.eye(200, dtype=torch.float64), atol=0.1, rtol=0)


def test_gaussian_entries_have_the_moments_of_n_0_1_over_k() -> None:
    k = 4000
    z = RandomProjection(200, k, "gaussian", seed=2).matrix().double().flatten() * math.sqrt(k)
    n = z.numel()  # 800,000 draws: 5 standard errors of each moment below
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(z.pow(4).mean()) - 3) < 5 * math.sqrt(96 / n)  # var(z^4) = 105 - 9 = 96
    assert abs(float((z.abs() < 1).double().mean()) - math.erf(1 / math.sqrt(2))) < 5 * math.sqrt(0.25 / n)
    assert len(torch.unique(z)) > 0.99 * n  # continuous, not a few levels


def test_rademacher_entries_are_plus_minus_one_over_sqrt_k() -> None:
    k = 500
    mat = RandomProjection(300, k, "rademacher", seed=4, block_rows=128).matrix()
    values = sorted(float(v) for v in torch.unique(mat))
    assert values == pytest.approx([-1 / math.sqrt(k), 1 / math.sqrt(k)], rel=1e-6)
    plus = float((mat > 0).double().mean())
    assert abs(plus - 0.5) < 5 * math.sqrt(0.25 / mat.numel())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_norms_preserved_within_the_jl_bound(kind: ProjectionKind) -> None:
    # JL: k >= 8 ln(n) / eps^2 keeps every ||P^T x||^2 within (1 +- eps) ||x||^2 (with probability
    # >= 1 - 1/n); here eps = sqrt(8 ln(n) / k) = 0.25 for n = 50 vectors and k = 500
    n, d, k = 50, 2000, 500
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * torch.linspace(
        0.1, 3.0, d, dtype=torch.float64
    )
    eps = math.sqrt(8 * math.log(n) / k)
    ratio = RandomProjection(d, k, kind, seed=6).project(x).pow(2).sum(1) / x.pow(2).sum(1)
    assert float((ratio - 1).abs().max()) < eps
    assert float((ratio - 1).abs().max()) > 0.01  # a projection, not an isometry by accident


def test_same_seed_same_matrix_in_a_new_process() -> None:
    here = RandomProjection(500, 8, "gaussian", seed=11, block_rows=128).matrix()
    code = (
        "import torch;from rlattr.core import RandomProjection;"
        "m=RandomProjection(500,8,'gaussian',seed=11,block_rows=128).matrix();"
        "print(','.join(repr(float(v)) for v in m.flatten()[::37]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    theirs = torch.tensor([float(v) for v in out.strip().split(",")])
    assert torch.equal(theirs, here.flatten()[::37])
    assert not torch.equal(here, RandomProjection(500, 8, "gaussian", seed=12, block_rows=128).matrix())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="kind: got 'cauchy'"):
        RandomProjection(10, 2, "cauchy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density"):
        RandomProjection(10, 2, "sparse", density=0.0)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 10\), got \(3, 9\)"):
        RandomProjection(10, 2).project(torch.zeros(3, 9))
