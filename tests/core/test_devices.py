"""Every core method on a float32 and a float64 model: the scores keep the model's dtype and
device, and the float64 scores match the float32 ones to float32 precision.

The methods run under hostile defaults: torch's default dtype is the *other* float type, and its
default device is ``meta`` (model on the CPU) or the CPU (model on a GPU). A tensor the core creates
without ``device=`` then lands on the wrong device, and combining it with the model's tensors
raises; one created without ``dtype=`` turns float32 scores into float64 ones (or a float64 matmul
into a dtype error). Without a GPU this is a CPU-vs-meta check; on a machine with CUDA the same
cases also run with the model on ``cuda``, which adds the real kernels (cuSOLVER Cholesky and eigh,
vmap / jvp on the GPU) and a real host-device mismatch instead of the meta stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from rlattr.core import RandomProjection, Task
from rlattr.core.grads import (
    directional_scores,
    flatten,
    group_dots,
    loss_grads_sum,
    per_record_grads,
    target_grads,
)
from rlattr.core.methods import (
    STRATEGIES,
    TRAK,
    GradCos,
    GradDot,
    InfluenceFunction,
    LearnedWeights,
    NewtonStep,
    RescaledInfluence,
    TracIn,
    query_grads,
    self_influence,
)
from rlattr.core.projection import PROJECTION_KINDS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = (torch.float32, torch.float64)


@dataclass
class Case:
    model: nn.Module
    train: dict[str, Tensor]
    query: dict[str, Tensor]

    @property
    def task(self) -> Task:
        return Task(self.model, self.ce)

    def ce(self, params: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(self.logits(params, b), b["y"], reduction="none")

    def logits(self, params: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return functional_call(self.model, params, (b["x"],))


def make_case(dtype: torch.dtype, device: str) -> Case:
    """The same tanh MLP and data in ``dtype`` on ``device`` (built in float64, then cast)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    model = model.to(device=device, dtype=dtype)
    train = {"x": x[:20].to(device=device, dtype=dtype), "y": y[:20].to(device)}
    query = {"x": x[20:].to(device=device, dtype=dtype), "y": y[20:].to(device)}
    return Case(model, train, query)


@contextmanager
def hostile_defaults(dtype: torch.dtype, device: str) -> Iterator[None]:
    other = torch.float64 if dtype == torch.float32 else torch.float32
    saved = torch.get_default_dtype()
    torch.set_default_dtype(other)
    try:
        with torch.device("meta" if device == "cpu" else "cpu"):
            yield
    finally:
        torch.set_default_dtype(saved)


def _strong(c: Case, strategy: str, **extra: Any) -> Tensor:
    # damping well above the MLP Hessian's negative eigenvalues keeps float32 solves accurate
    options: dict[str, dict[str, Any]] = {
        "explicit": {},
        "cg": {"max_iter": 30, "tol": 1e-6},
        "lissa": {"depth": 15},  # not converged: only dtype, device and float32 vs float64 are checked
        "ekfac": {},
        "arnoldi": {"rank": 43},  # every parameter of the 4-5-3 MLP: the exact inverse
    }
    attr = InfluenceFunction(c.task, strategy=strategy, l2=0.1, damping=0.5, **options[strategy], **extra)
    return attr.cache(c.train).attribute(c.query)


def _gauss_newton(c: Case) -> dict[str, Any]:
    return {
        "output": c.logits,
        "output_loss": lambda z, b: nn.functional.cross_entropy(z, b["y"], reduction="none"),
    }


def _log_prob_of_label(c: Case) -> Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]:
    def out(params: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        z = c.logits(params, b)
        return z.gather(1, b["y"][:, None]).squeeze(1) - torch.logsumexp(z, 1)

    return out


def _trak(c: Case, proj_dim: int | None) -> Tensor:
    out = _log_prob_of_label(c)
    members = [c.task.tracked_params(), {k: 1.01 * v for k, v in c.task.tracked_params().items()}]
    trak = TRAK(
        c.task, members, proj_dim=proj_dim, output=out, output_weight=lambda p, b: 1 - out(p, b).exp()
    )
    return trak.cache(c.train).attribute(c.query)


def _tracin(c: Case) -> Tensor:
    ckpts = [c.task.tracked_params(), {k: 0.9 * v for k, v in c.task.tracked_params().items()}]
    return TracIn(c.task, ckpts, [0.1, 0.05]).cache(c.train).attribute(c.query)


def _learned_weights(c: Case) -> Tensor:
    lw = LearnedWeights(GradDot(c.task), steps=40).cache(c.train)
    with torch.device(c.train["x"].device):  # torch.optim.Adam creates its step counters without device=
        lw.fit(c.query)
    return lw.attribute(c.query)


def _target_task(c: Case) -> Task:
    return Task(c.model, c.ce, target=lambda p, b: c.ce(p, b).mean(), target_goal="lower")


def _grads(c: Case) -> Tensor:
    """Per-record grads (vmap and loop), JVP scores by group, group dots, target and summed grads."""
    names = c.task.tracked_names
    direction = {k: v.flip(-1) for k, v in c.task.tracked_params().items()}
    per = per_record_grads(c.task, c.train)
    parts = [
        flatten(per, names),
        flatten(per_record_grads(c.task, c.train, method="loop"), names),
        directional_scores(c.task, c.train, direction, by_group=True),
        group_dots(c.task, per, direction),
        flatten(target_grads(_target_task(c), c.query), names),
        flatten({k: v[None] for k, v in loss_grads_sum(c.task, c.train).items()}, names),
    ]
    return torch.cat([x.reshape(-1) for x in parts])


def _projections(c: Case) -> Tensor:
    g = flatten(per_record_grads(c.task, c.train), c.task.tracked_names)
    return torch.cat(
        [RandomProjection(g.shape[1], 16, kind, seed=1).project(g) for kind in PROJECTION_KINDS], dim=1
    )


METHODS: dict[str, Callable[[Case], Tensor]] = {
    "per_record_grads": _grads,
    "projections": _projections,
    "grad_dot": lambda c: GradDot(c.task).cache(c.train).attribute(c.query),
    "grad_cos": lambda c: GradCos(c.task).cache(c.train).attribute(c.query),
    "grad_dot_projected": lambda c: (
        GradDot(c.task, projector=RandomProjection(c.task.num_params, 32, "sparse"))
        .cache(c.train)
        .attribute(c.query)
    ),
    "grad_dot_by_group": lambda c: GradDot(c.task).cache(c.train).attribute_by_group(c.query),
    "grad_dot_target": lambda c: GradDot(_target_task(c)).cache(c.train).attribute(c.query),
    "query_grads_target": lambda c: query_grads(_target_task(c), c.query),
    "tracin": _tracin,
    **{f"influence_{s}": (lambda c, s=s: _strong(c, s)) for s in STRATEGIES},  # type: ignore[misc]
    "influence_lissa_minibatch": lambda c: _strong(c, "lissa", batch_size=8, seed=1, scale=3.0),
    "influence_cg_gauss_newton": lambda c: _strong(c, "cg", **_gauss_newton(c)),
    "self_influence": lambda c: self_influence(InfluenceFunction(c.task, l2=0.1, damping=0.5).cache(c.train)),
    "trak_primal": lambda c: _trak(c, proj_dim=8),
    "trak_dual": lambda c: _trak(c, proj_dim=64),
    "trak_plain": lambda c: TRAK(c.task, proj_dim=None).cache(c.train).attribute(c.query),
    "rif_rank_one": lambda c: (
        RescaledInfluence(c.task, l2=0.1, damping=5.0).cache(c.train).attribute(c.query)
    ),
    "rif_gauss_newton": lambda c: (
        RescaledInfluence(c.task, l2=0.1, damping=0.5, **_gauss_newton(c)).cache(c.train).attribute(c.query)
    ),
    "newton_step": lambda c: NewtonStep(c.task, l2=0.1, damping=0.5).cache(c.train).attribute(c.query),
    "newton_removal": lambda c: (
        NewtonStep(c.task, l2=0.1, damping=0.5)
        .cache(c.train)
        .removal_effect(c.query, [[0, 3], torch.arange(20, device=c.train["x"].device) < 5])
    ),
    "learned_weights": _learned_weights,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_scores_keep_the_models_dtype_and_device(name: str, device: str) -> None:
    scores = {}
    for dtype in DTYPES:
        case = make_case(dtype, device)
        with hostile_defaults(dtype, device):
            got = METHODS[name](case)
        assert got.dtype == dtype, f"{name}: {dtype} model gave {got.dtype} scores"
        assert got.device.type == device, f"{name}: model on {device}, scores on {got.device}"
        assert bool(torch.isfinite(got).all())
        scores[dtype] = got.double().cpu()
    low, high = scores[torch.float32], scores[torch.float64]
    scale = float(high.abs().max())
    assert scale > 0
    assert float((low - high).abs().max()) <= 2e-4 * scale, f"{name}: float32 and float64 scores differ"


def test_every_strategy_is_covered() -> None:
    assert {f"influence_{s}" for s in STRATEGIES} <= set(METHODS)
