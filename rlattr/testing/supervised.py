"""Small supervised problems for the offline core: scikit-learn's digits, logistic regression, an MLP.

Digits ships inside scikit-learn (no download). Training is deterministic (fixed initialisation,
full-batch optimisation), and every trainer takes per-record ``weights`` so that leave-one-out
and subset retraining keep the same shapes: ``weights[i] = 0`` removes record i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError

ModelKind = Literal["logreg", "mlp"]
MODEL_KINDS = ("logreg", "mlp")


@dataclass
class SupervisedData:
    """Train and test split: ``x_*: Tensor[n, 64]`` standardised, ``y_*: Tensor[n]`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    images_train: Tensor
    images_test: Tensor

    def train_batch(self) -> dict[str, Tensor]:
        return {"x": self.x_train, "y": self.y_train}

    def test_batch(self) -> dict[str, Tensor]:
        return {"x": self.x_test, "y": self.y_test}


def load_digits_split(
    n_train: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SupervisedData:
    """scikit-learn's 8x8 digits (1797 images), shuffled with ``seed``, first ``n_train`` for training."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    n = len(raw.target)
    if not 1 <= n_train < n:
        raise RlattrError(f"n_train: must be in [1, {n - 1}], got {n_train}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(raw.data, dtype=dtype)[perm]
    y = torch.as_tensor(raw.target, dtype=torch.int64)[perm]
    images = torch.as_tensor(raw.images, dtype=dtype)[perm]
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return SupervisedData(
        x[:n_train], y[:n_train], x[n_train:], y[n_train:], images[:n_train], images[n_train:]
    )


def make_model(
    kind: ModelKind, n_in: int = 64, n_out: int = 10, hidden: int = 64, seed: int = 0
) -> nn.Module:
    """``"logreg"``: one Linear layer; ``"mlp"``: Linear-Tanh-Linear. Initialised from ``seed``."""
    if kind not in MODEL_KINDS:
        raise RlattrError(f"kind: got {kind!r}; supported: {MODEL_KINDS}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "logreg":
            linear = nn.Linear(n_in, n_out)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            model: nn.Module = nn.Sequential(linear)
        else:
            model = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))
    return model


def make_cnn(conv: int = 6, channels: int = 8, hidden: int = 32, seed: int = 0) -> nn.Module:
    """A small tanh CNN on the 8x8 digits (input the flat ``Tensor[n, 64]``), initialised from ``seed``.

    ``conv`` 3x3 convolutions (padding 1; the third and the last of them with stride 2 when there are
    at least 4, so 8x8 -> 4x4 -> 2x2), then Linear(-> ``hidden``), Tanh, Linear(-> 10): with
    ``groups="tensor"`` every weight and bias is its own group, ``2 conv + 4`` groups (16 by default).
    Two Linear layers, so :func:`train_classifier` trains it with Adam, not L-BFGS.
    """
    if conv < 1 or channels < 1 or hidden < 1:
        raise RlattrError(f"conv, channels, hidden: got {conv}, {channels}, {hidden}; supported: all >= 1")
    strided = {2, conv - 1} if conv >= 4 else set()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
        size, c_in = 8, 1
        for i in range(conv):
            c_out = channels if i < 2 else 2 * channels
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i in strided else 1, padding=1), nn.Tanh()]
            size, c_in = (size + 1) // 2 if i in strided else size, c_out
        layers += [nn.Flatten(), nn.Linear(c_in * size * size, hidden), nn.Tanh(), nn.Linear(hidden, 10)]
        return nn.Sequential(*layers)


def per_record_ce(model: nn.Module) -> Callable[[Params, Batch], Tensor]:
    """``(params, batch) -> Tensor[n]``: cross-entropy of each record under ``params``."""

    def loss(params: Params, batch: Batch) -> Tensor:
        logits = functional_call(model, params, (batch["x"],))
        return nn.functional.cross_entropy(logits, batch["y"], reduction="none")

    return loss


def classification_task(model: nn.Module, **kwargs: object) -> Task:
    """A Task whose training loss and (default) query loss are per-record cross-entropy."""
    return Task(model, per_record_ce(model), **kwargs)  # type: ignore[arg-type]


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None = None,
    l2: float = 1e-3,
    steps: int | None = None,
    lr: float | None = None,
) -> nn.Module:
    """Minimise ``sum_i w_i CE_i / sum_i w_i + (l2 / 2) ||theta||^2`` in place; returns the model.

    A single Linear layer (logistic regression) is solved with full-batch L-BFGS to convergence;
    anything else with ``steps`` full-batch Adam steps (default 500, lr 1e-2). Deterministic.
    """
    n = x.shape[0]
    w = torch.ones(n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise RlattrError(
            f"weights: expected Tensor[{n}] >= 0 with a positive sum, got shape {tuple(w.shape)}"
        )
    params = [p for p in model.parameters() if p.requires_grad]

    def objective() -> Tensor:
        ce = nn.functional.cross_entropy(model(x), y, reduction="none")
        return (w * ce).sum() / w.sum() + 0.5 * l2 * sum(p.pow(2).sum() for p in params)

    convex = sum(1 for m in model.modules() if isinstance(m, nn.Linear)) == 1
    if convex:
        opt = torch.optim.LBFGS(
            params,
            lr=1.0 if lr is None else lr,
            max_iter=steps or 500,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt2 = torch.optim.Adam(params, lr=1e-2 if lr is None else lr)
        for _ in range(steps or 500):
            opt2.zero_grad()
            objective().backward()
            opt2.step()
    return model


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def per_record_logits(model: nn.Module) -> Callable[[Params, Batch], Tensor]:
    """``(params, batch) -> Tensor[n, classes]``: the logits (the outputs the loss is a function of)."""

    def logits(params: Params, batch: Batch) -> Tensor:
        return functional_call(model, params, (batch["x"],))

    return logits


def ce_of_logits(logits: Tensor, batch: Batch) -> Tensor:
    """``Tensor[n]``: cross-entropy of ``logits: Tensor[n, classes]`` against ``batch["y"]``."""
    return nn.functional.cross_entropy(logits, batch["y"], reduction="none")


def per_record_margin(model: nn.Module) -> Callable[[Params, Batch], Tensor]:
    """``(params, batch) -> Tensor[n]``: ``log(p_y / (1 - p_y)) = z_y - logsumexp_{c != y} z_c``."""

    def margin(params: Params, batch: Batch) -> Tensor:
        z = functional_call(model, params, (batch["x"],))
        y = batch["y"]
        correct = z.gather(1, y[:, None]).squeeze(1)
        others = z.masked_fill(torch.arange(z.shape[1], device=z.device) == y[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    return margin


def margin_weight(model: nn.Module) -> Callable[[Params, Batch], Tensor]:
    """``(params, batch) -> Tensor[n]``: ``1 - p_y``, d(cross-entropy) / d(-margin)."""

    def weight(params: Params, batch: Batch) -> Tensor:
        z = functional_call(model, params, (batch["x"],))
        return 1.0 - torch.softmax(z, dim=1).gather(1, batch["y"][:, None]).squeeze(1)

    return weight


def model_sampled_batch(model: nn.Module, batch: Batch, draws: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """``batch["x"]`` repeated ``draws`` times with labels sampled from the model's softmax.

    The per-record gradients of the cross-entropy on such a batch estimate the true Fisher
    (``E_{y ~ p_theta}[g g^T]``), e.g. as ``hessian_data`` for EK-FAC.
    """
    if draws < 1:
        raise RlattrError(f"draws: must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probs = torch.softmax(model(batch["x"]), dim=1)
    x = batch["x"].repeat(draws, *([1] * (batch["x"].dim() - 1)))
    y = torch.multinomial(probs.repeat(draws, 1).float(), 1, generator=gen).squeeze(1)
    return {"x": x, "y": y}
