"""Ghost dot products and row gradients against per-record autograd (a for-loop, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rlattr.core.ghost import (
    GhostCapture,
    LinearHandler,
    build_target,
    record_dots,
    register_handler,
    rows_grad_sum,
)
from rlattr.errors import RlattrError


class Transposed(nn.Module):
    """``y = x W + b`` with ``W: [in, out]`` (the layout of transformers' Conv1D)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class TinySeq(nn.Module):
    """Embedding -> LayerNorm -> transposed layer -> tanh -> Linear head tied to the embedding."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.mix = Transposed(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as in GPT-2
        self.proj = nn.Linear(width, width)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.norm(self.emb(ids))))
        return self.head(h + self.proj(h))


register_handler(Transposed, LinearHandler(transposed=True))


def _loss_rows(model: TinySeq, ids: Tensor, weights: Tensor) -> Tensor:
    logp = torch.log_softmax(model(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(logp.sum(1) * weights)


def _flat_grad(model: nn.Module, value: Tensor) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


@pytest.mark.parametrize("form", ["dense", "ghost", "auto"])
def test_record_dots_equal_per_record_autograd(form: str) -> None:
    torch.manual_seed(0)
    model = TinySeq().double()
    ids, held = torch.randint(0, 11, (5, 7)), torch.randint(0, 11, (2, 4))
    weights = torch.randn(5, dtype=torch.float64)
    capture = GhostCapture(model)
    assert capture.uncovered == []
    with capture.recording() as target_recs:
        f = _loss_rows(model, held, torch.ones(2, dtype=torch.float64)).sum()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(f, [dict(model.named_parameters())[n] for n in names])
    target = build_target(capture, target_recs, dict(zip(names, grads, strict=True)), form=form)
    # tied weights (emb / head) never take the ghost form; auto: S = 6 tokens x (6 + 6) > 6 x 6, so dense
    assert set(target.ghost) == ({"mix", "proj"} if form == "ghost" else set())
    with capture.recording() as recs:
        loss = _loss_rows(model, ids, weights).sum()
    loss.backward()
    got = record_dots(capture, recs, target)
    gf = torch.cat([g.reshape(-1) for g in grads])
    expected = torch.stack(
        [
            gf @ _flat_grad(model, _loss_rows(model, ids[i : i + 1], weights[i : i + 1]).sum())
            for i in range(5)
        ]
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-8)


def test_rows_grad_sum_is_the_gradient_of_those_rows() -> None:
    torch.manual_seed(1)
    model = TinySeq().double()
    ids, weights = torch.randint(0, 11, (6, 5)), torch.rand(6, dtype=torch.float64)
    capture = GhostCapture(model)
    with capture.recording() as recs:
        loss = _loss_rows(model, ids, weights).sum()
    loss.backward()
    rows = torch.tensor([True, False, False, True, True, False])
    got = rows_grad_sum(capture, recs, rows)
    named = dict(model.named_parameters())
    expected = torch.autograd.grad(_loss_rows(model, ids[rows], weights[rows]).sum(), list(named.values()))
    for (name, _), g in zip(named.items(), expected, strict=True):
        torch.testing.assert_close(got[name].double(), g, rtol=1e-6, atol=1e-9)


def test_checkpointed_reruns_are_not_counted_and_bad_input_fails() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(2)
    model = TinySeq().double()
    ids = torch.randint(0, 11, (3, 5))
    capture = GhostCapture(model)
    with capture.recording() as recs:
        h = checkpoint(lambda x: torch.tanh(model.mix(model.norm(x))), model.emb(ids), use_reentrant=False)
        loss = (model.head(h + model.proj(h)) ** 2).sum()
    loss.backward()
    assert sum(r.name == "mix" and r.d is not None for r in recs) == 1
    with pytest.raises(RlattrError, match="module_type: got 3; supported"):
        register_handler(3, LinearHandler())  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="records: no captured layer"):
        record_dots(capture, [], build_target(capture, [], {}))
    with pytest.raises(RlattrError, match="form: got 'fast'; supported"):
        build_target(capture, [], {}, form="fast")
