"""Unlearning-based scores against hand-derived loss changes and an independent autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rlattr.core.methods import Unlearning
from rlattr.core.task import Task
from rlattr.errors import RlattrError


def _squared_task(d: int = 5, n: int = 12, seed: int = 0) -> tuple[Task, dict[str, torch.Tensor], dict]:
    """Linear model without bias, loss 0.5 (w . x - y)^2: the ascent step's effect is an exact quadratic."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))

    def loss(params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        return 0.5 * (functional_call(model, params, (batch["x"],)).squeeze(1) - batch["y"]).pow(2)

    train = {
        "x": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "y": torch.randn(n, generator=gen, dtype=torch.float64),
    }
    query = {
        "x": torch.randn(3, d, generator=gen, dtype=torch.float64),
        "y": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    return Task(model, loss), train, query


def _hand(task: Task, train: dict, query: dict, eta_of_gq) -> torch.Tensor:
    """delta_i = eta r_i x_i.g_q + eta^2/2 (x_i.g_q)^2 with g_q = r_q x_q, r = w.x - y."""
    w = task.tracked_params()["weight"][0]
    r_train = train["x"] @ w - train["y"]
    r_q = query["x"] @ w - query["y"]
    rows = []
    for j in range(query["x"].shape[0]):
        gq = r_q[j] * query["x"][j]
        eta = eta_of_gq(gq)
        proj = train["x"] @ gq
        rows.append(eta * r_train * proj + 0.5 * eta**2 * proj**2)
    return torch.stack(rows)


def test_one_exact_step_equals_the_quadratic_expansion():
    task, train, query = _squared_task()
    scores = Unlearning(task, lr=0.3, max_step=None, normalize="none").cache(train).attribute(query)
    torch.testing.assert_close(scores, _hand(task, train, query, lambda g: 0.3), rtol=1e-10, atol=1e-12)


def test_the_step_is_bounded_and_step_normalisation_divides_by_its_length():
    task, train, query = _squared_task(seed=1)
    attr = Unlearning(task, lr=100.0, max_step=0.05, normalize="step").cache(train)
    expected = _hand(task, train, query, lambda g: 0.05 / g.norm()) / 0.05
    torch.testing.assert_close(attr.attribute(query), expected, rtol=1e-9, atol=1e-12)
    theta = task.tracked_params()["weight"]
    for params in attr.unlearned(query):
        assert float((params["weight"] - theta).norm()) == pytest.approx(0.05, rel=1e-12)


def test_two_steps_match_a_plain_autograd_loop_and_zscore_standardises():
    task, train, query = _squared_task(seed=2)
    attr = Unlearning(task, lr=0.2, steps=2, max_step=None, normalize="zscore").cache(train)
    scores = attr.attribute(query)
    w0 = task.tracked_params()["weight"]
    for j in range(3):
        w = w0.clone()
        for _ in range(2):
            w = w.requires_grad_(True)
            lq = task.loss({"weight": w}, {"x": query["x"][j : j + 1], "y": query["y"][j : j + 1]}).sum()
            (g,) = torch.autograd.grad(lq, w)
            w = (w + 0.2 * g).detach()
        delta = task.loss({"weight": w}, train) - task.loss({"weight": w0}, train)
        torch.testing.assert_close(scores[j], (delta - delta.mean()) / delta.std(), rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:per-record gradients")  # dropout: the autograd-loop fallback
def test_both_models_see_the_same_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double().train()

    def loss(params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        return (functional_call(model, params, (batch["x"],)).squeeze(1) - batch["y"]).pow(2)

    gen = torch.Generator().manual_seed(3)
    train = {
        "x": torch.randn(30, 4, generator=gen, dtype=torch.float64),
        "y": torch.randn(30, generator=gen, dtype=torch.float64),
    }
    query = {"x": train["x"][:2], "y": train["y"][:2]}
    task = Task(model, loss)
    attr = Unlearning(task, lr=1e-5, max_step=None, normalize="none", seed=7).cache(train)
    scores = attr.attribute(query)

    def seeded(params: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return loss(params, train)

    theta = task.tracked_params()
    for j, params in enumerate(attr.unlearned(query)):
        torch.testing.assert_close(scores[j], seeded(params, 7) - seeded(theta, 7), rtol=1e-9, atol=1e-12)
    # without consistent randomness the "skew" would be dominated by the masks, not the step
    assert float((seeded(theta, 8) - seeded(theta, 7)).abs().max()) > 100 * float(scores.abs().max())


def test_arguments_are_validated():
    task, train, query = _squared_task()
    with pytest.raises(RlattrError, match="lr: got 0"):
        Unlearning(task, lr=0.0)
    with pytest.raises(RlattrError, match="steps: got 0; supported: >= 1"):
        Unlearning(task, steps=0)
    with pytest.raises(RlattrError, match="max_step: got -1"):
        Unlearning(task, max_step=-1.0)
    with pytest.raises(RlattrError, match="normalize: got 'l2'; supported"):
        Unlearning(task, normalize="l2")  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="query: got per-record shape"):
        Unlearning(task).cache(train).attribute(
            {"x": torch.zeros(2, 3, dtype=torch.float64), "y": torch.zeros(2, dtype=torch.float64)}
        )
