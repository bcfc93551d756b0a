"""Tiny float64 problems shared by the attribution tests (digits subsets, a few features, 3 classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rlattr.core.task import Task
from rlattr.testing.supervised import classification_task, load_digits_split, make_model, train_classifier

FEATURES = [10, 13, 20, 26, 34, 42, 43, 53]  # pixels with spread in the digits images


@dataclass
class Problem:
    model: nn.Module
    task: Task
    train: dict[str, Tensor]
    query: dict[str, Tensor]
    l2: float


def logreg_problem(n: int = 60, m: int = 4, l2: float = 0.05, groups: str = "module") -> Problem:
    data = load_digits_split(400, seed=1, dtype=torch.float64)
    x, y = data.x_train[:n, FEATURES], data.y_train[:n] % 3
    model = make_model("logreg", n_in=len(FEATURES), n_out=3).double()
    train_classifier(model, x, y, l2=l2)
    query = {"x": data.x_test[:m, FEATURES], "y": data.y_test[:m] % 3}
    return Problem(model, classification_task(model, groups=groups), {"x": x, "y": y}, query, l2)


def mlp_problem(n: int = 40, m: int = 3, l2: float = 0.05) -> Problem:
    data = load_digits_split(400, seed=2, dtype=torch.float64)
    x, y = data.x_train[:n, FEATURES], data.y_train[:n] % 3
    model = make_model("mlp", n_in=len(FEATURES), n_out=3, hidden=6).double()
    train_classifier(model, x, y, l2=l2, steps=200)
    query = {"x": data.x_test[:m, FEATURES], "y": data.y_test[:m] % 3}
    return Problem(model, classification_task(model), {"x": x, "y": y}, query, l2)


def logreg_closed_form(p: Problem, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-record gradients ``[n, d]`` and Hessians ``[n, d, d]`` of multinomial cross-entropy, by
    hand in numpy: theta = (W row-major [C, D], b [C]), z = W x + b."""
    layer = p.model.get_submodule("0")
    assert isinstance(layer, nn.Linear)
    w = layer.weight.detach().numpy()
    b = layer.bias.detach().numpy()
    xs, ys = x.numpy(), y.numpy()
    c, dim = w.shape
    grads, hessians = [], []
    for xi, yi in zip(xs, ys, strict=True):
        z = w @ xi + b
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        jac = np.zeros((c, c * dim + c))  # dz / dtheta
        for k in range(c):
            jac[k, k * dim : (k + 1) * dim] = xi
            jac[k, c * dim + k] = 1.0
        onehot = np.eye(c)[yi]
        grads.append(jac.T @ (prob - onehot))
        hessians.append(jac.T @ (np.diag(prob) - np.outer(prob, prob)) @ jac)
    return np.array(grads), np.array(hessians)
