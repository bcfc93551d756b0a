"""LearnedWeights: per-group contributions sum to the base score; on a constructed problem where
one parameter group carries all the signal, the learned weights concentrate on that group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rlattr.core.methods import (
    TRAK,
    GradCos,
    GradDot,
    InfluenceFunction,
    LearnedWeights,
    RescaledInfluence,
    TracIn,
)
from rlattr.core.methods.weighting import topk_objective
from rlattr.core.task import Task
from tests.core._tda import logreg_problem


@pytest.fixture(scope="module")
def lr():
    return logreg_problem(n=40, groups="tensor")


@pytest.mark.parametrize("name", ["dot", "cos", "cos-proj", "tracin", "if", "trak", "rif"])
def test_group_contributions_sum_to_scores(lr, name):
    from rlattr.core.projection import RandomProjection

    build = {
        "dot": lambda: GradDot(lr.task),
        "cos": lambda: GradCos(lr.task),
        "cos-proj": lambda: GradCos(lr.task, projector=RandomProjection(lr.task.num_params, 8, seed=2)),
        "tracin": lambda: TracIn(lr.task, [lr.task.tracked_params()] * 2, [0.1, 0.2]),
        "if": lambda: InfluenceFunction(lr.task, l2=lr.l2),
        "trak": lambda: TRAK(lr.task, proj_dim=16),
        "rif": lambda: RescaledInfluence(lr.task, l2=lr.l2),
    }[name]
    attr = build().cache(lr.train)
    parts = attr.attribute_by_group(lr.query)
    assert parts.shape == (4, 40, 2)  # groups: weight, bias
    np.testing.assert_allclose(parts.sum(-1).numpy(), attr.attribute(lr.query).numpy(), rtol=1e-6, atol=1e-9)


class _TwoGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(8, dtype=torch.float64))


def _signal_problem() -> tuple[Task, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Group a: each query aligns with 3 training records only; group b: dense Gaussian noise."""
    gen = torch.Generator().manual_seed(0)
    n, m = 60, 5
    u = 0.1 * torch.randn(n, 8, generator=gen, dtype=torch.float64)
    for q in range(m):
        u[3 * q : 3 * q + 3, q] += 3.0
    train = {"u": u, "v": torch.randn(n, 8, generator=gen, dtype=torch.float64)}
    query = {
        "u": torch.eye(8, dtype=torch.float64)[:m],
        "v": torch.randn(m, 8, generator=gen, dtype=torch.float64),
    }

    def loss(params, batch):  # linear: the gradient of record i is (-u_i, -v_i)
        return -(batch["u"] @ params["a"] + batch["v"] @ params["b"])

    return Task(_TwoGroups(), loss, groups="tensor"), train, query


def test_weights_concentrate_on_the_signal_group():
    task, train, query = _signal_problem()
    lw = LearnedWeights(GradDot(task), top_k=3, steps=200, lr=0.1).cache(train).fit(query)
    w = lw.group_weights
    assert set(w) == {"a", "b"}
    assert w["a"] > 1.9 and w["b"] < 0.1  # weights average to 1: at most 2 here
    assert lw.history[-1] < lw.history[0]
    # the objective, recomputed by hand at the learned and at uniform weights
    contrib = GradDot(task).cache(train).attribute_by_group(query)
    for weights in (lw.weights.double(), torch.ones(2, dtype=torch.float64)):
        tau = (contrib @ weights).numpy()
        top = np.sort(tau, axis=1)[:, -3:].mean(1)
        by_hand = -(top / np.linalg.norm(tau, axis=1)).mean() + 1e-3 * float(weights.pow(2).sum())
        assert float(topk_objective(contrib, weights, 3, 1e-3)) == pytest.approx(by_hand, rel=1e-9)
    # the weighted scores rank each query's three planted records first
    scores = lw.attribute(query)
    for q in range(5):
        assert set(scores[q].topk(3).indices.tolist()) == {3 * q, 3 * q + 1, 3 * q + 2}


def test_unfitted_weights_reproduce_the_base(lr):
    base = GradDot(lr.task)
    lw = LearnedWeights(base).cache(lr.train)
    np.testing.assert_allclose(lw.attribute(lr.query).numpy(), base.attribute(lr.query).numpy(), rtol=1e-6)


def test_bad_arguments(lr):
    with pytest.raises(TypeError, match="base"):
        LearnedWeights(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        LearnedWeights(GradDot(lr.task), top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        LearnedWeights(GradDot(lr.task), top_k=500).cache(lr.train).fit(lr.query)
    with pytest.raises(RuntimeError, match="cache"):
        LearnedWeights(GradDot(lr.task)).fit(lr.query)
