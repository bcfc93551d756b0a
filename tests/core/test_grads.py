"""Per-record gradients, target gradients and JVP scores against plain autograd loops (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rlattr.core import Task, directional_scores, flatten, group_dots, per_record_grads, target_grads


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(tokens)).mean(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def _inputs(kind: str, n: int) -> torch.Tensor:
    if kind == "cnn":
        return torch.randn(n, 1, 6, 6, dtype=torch.float64)
    if kind == "tokens":
        return torch.randint(0, 11, (n, 5))
    return torch.randn(n, 5, dtype=torch.float64)


MODELS = {"mlp": (_mlp, "dense"), "cnn": (SmallCNN, "cnn"), "layernorm_embedding": (TokenModel, "tokens")}


def _task(model: nn.Module, **kwargs: object) -> Task:
    def loss(params: dict, batch: dict) -> torch.Tensor:
        logits = functional_call(model, params, (batch["x"],))
        return nn.functional.cross_entropy(logits, batch["y"], reduction="none")

    return Task(model, loss, **kwargs)  # type: ignore[arg-type]


def _autograd_loop(model: nn.Module, batch: dict, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch["y"].shape[0]):
        model.zero_grad()
        logits = model(batch["x"][i : i + 1])
        nn.functional.cross_entropy(logits, batch["y"][i : i + 1]).backward()
        grads = [params[n].grad for n in names]
        assert all(g is not None for g in grads)
        rows.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))
    return torch.stack(rows)


@pytest.fixture(params=sorted(MODELS))
def problem(request: pytest.FixtureRequest) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    make, kind = MODELS[request.param]
    model = make().double()
    batch = {"x": _inputs(kind, 13), "y": torch.randint(0, 4, (13,))}
    return model, batch


def test_vmap_grads_equal_autograd_loop(problem: tuple[nn.Module, dict]) -> None:
    model, batch = problem
    task = _task(model)
    got = flatten(per_record_grads(task, batch, chunk_size=5, method="vmap"), task.tracked_names)
    ref = _autograd_loop(model, batch, task.tracked_names)
    assert got.shape == (13, task.num_params)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)


def test_loop_method_equals_vmap(problem: tuple[nn.Module, dict]) -> None:
    model, batch = problem
    task = _task(model)
    a = flatten(per_record_grads(task, batch, method="loop"), task.tracked_names)
    b = flatten(per_record_grads(task, batch, method="vmap"), task.tracked_names)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_jvp_scores_equal_explicit_dot_products(problem: tuple[nn.Module, dict]) -> None:
    model, batch = problem
    task = _task(model)
    direction = {n: torch.randn_like(p) for n, p in task.tracked_params().items()}
    got = directional_scores(task, batch, direction, chunk_size=4)
    ref = (
        _autograd_loop(model, batch, task.tracked_names)
        @ flatten({n: d.unsqueeze(0) for n, d in direction.items()}, task.tracked_names)[0]
    )
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_by_group_columns_are_per_layer_dots_and_sum_to_total() -> None:
    torch.manual_seed(1)
    model = _mlp().double()
    batch = {"x": _inputs("dense", 9), "y": torch.randint(0, 4, (9,))}
    task = _task(model)
    direction = {n: torch.randn_like(p) for n, p in task.tracked_params().items()}
    by_group = directional_scores(task, batch, direction, by_group=True)
    assert task.group_names == ["0", "2"] and by_group.shape == (9, 2)
    ref_layer0 = sum(
        _autograd_loop(model, batch, [n]) @ direction[n].reshape(-1) for n in ("0.weight", "0.bias")
    )
    torch.testing.assert_close(by_group[:, 0], ref_layer0, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        by_group.sum(1), directional_scores(task, batch, direction), rtol=0, atol=1e-10
    )
    grads = per_record_grads(task, batch)
    torch.testing.assert_close(group_dots(task, grads, direction), by_group, rtol=0, atol=1e-10)


def test_target_grads_match_autograd() -> None:
    torch.manual_seed(2)
    model = _mlp().double()
    x = _inputs("dense", 6)

    def target(params: dict, batch: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (batch,))[:, 1]

    task = Task(model, lambda p, b: torch.zeros(b.shape[0]), target=target, params=["2.weight", "2.bias"])
    got = target_grads(task, x)
    assert got["2.weight"].shape == (6, 4, 7)
    for j in range(6):
        model.zero_grad()
        model(x[j : j + 1])[0, 1].backward()
        torch.testing.assert_close(
            got["2.weight"][j], dict(model.named_parameters())["2.weight"].grad, rtol=0, atol=1e-12
        )


def test_tracked_subset_by_regex_and_predicate() -> None:
    model = _mlp()
    assert Task(model, lambda p, b: b, params=r"^2\.").tracked_names == ["2.weight", "2.bias"]
    assert Task(model, lambda p, b: b, params=lambda n, p: p.dim() == 1).tracked_names == ["0.bias", "2.bias"]


def test_vmap_failure_falls_back_to_loop_with_warning() -> None:
    torch.manual_seed(3)
    model = _mlp().double()

    def loss(params: dict, batch: dict) -> torch.Tensor:
        out = functional_call(model, params, (batch["x"],))
        if float(out.sum()) > 1e9:  # data-dependent Python control flow: vmap cannot trace it
            out = out * 2
        return nn.functional.cross_entropy(out, batch["y"], reduction="none")

    batch = {"x": _inputs("dense", 5), "y": torch.randint(0, 4, (5,))}
    task = Task(model, loss)
    with pytest.warns(RuntimeWarning, match="falling back to a slower autograd loop"):
        got = flatten(per_record_grads(task, batch), task.tracked_names)
    torch.testing.assert_close(got, _autograd_loop(model, batch, task.tracked_names), rtol=0, atol=1e-10)


def test_unknown_parameter_name_is_named() -> None:
    with pytest.raises(ValueError, match=r"params: unknown parameter name\(s\) \['nope'\]"):
        Task(_mlp(), lambda p, b: b, params=["0.weight", "nope"])


def test_loss_of_wrong_shape_is_reported() -> None:
    model = _mlp().double()
    task = Task(model, lambda p, b: functional_call(model, p, (b["x"],)).sum())
    batch = {"x": _inputs("dense", 4), "y": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"loss: expected one value per record, shape \(4,\), got \(\)"):
        per_record_grads(task, batch)
    with pytest.raises(ValueError, match="loss: expected one value per record"):
        directional_scores(task, batch, {n: torch.zeros_like(p) for n, p in task.tracked_params().items()})


def test_nan_gradients_are_reported() -> None:
    model = _mlp().double()

    def loss(params: dict, batch: dict) -> torch.Tensor:
        return functional_call(model, params, (batch["x"],)).sum(1) * torch.tensor(float("nan"))

    task = Task(model, loss)
    with pytest.raises(FloatingPointError, match="per-record gradients: non-finite"):
        per_record_grads(task, {"x": _inputs("dense", 3)})


def test_bad_batch_and_direction_are_reported() -> None:
    model = _mlp().double()
    task = _task(model)
    with pytest.raises(ValueError, match="batch: tensor leaves must share a leading record dimension"):
        per_record_grads(task, {"x": _inputs("dense", 3), "y": torch.zeros(4, dtype=torch.long)})
    batch = {"x": _inputs("dense", 3), "y": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"direction: missing tracked parameter\(s\) \['2.bias'\]"):
        directional_scores(
            task, batch, {n: torch.zeros_like(p) for n, p in task.tracked_params().items() if n != "2.bias"}
        )
    with pytest.raises(ValueError, match="method: got 'fast'"):
        per_record_grads(task, batch, method="fast")  # type: ignore[arg-type]
