"""Random projections: JL inner-product preservation, determinism across processes, shapes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlattr.core import RandomProjection


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_inner_products_within_jl_bound(kind: str) -> None:
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


def test_gaussian_second_moment_is_identity_scaled() -> None:
    mat = RandomProjection(200, 4000, "rademacher", seed=1).matrix().double()
    torch.testing.assert_close(mat @ mat.T, torch.eye(200, dtype=torch.float64), atol=0.1, rtol=0)


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
