"""rlattr.rl.sequence: pair scores against a per-pair autograd loop, pair weights by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlattr.rl.sequence import (
    SequenceLossConfig,
    completion_logprobs,
    pair_loss_fn,
    pair_scales,
    pair_scores,
    sequence_task,
    target_direction,
)

V, P, C = 11, 4, 5


class TinyLM(nn.Module):
    """Embedding -> one causal attention mixer -> head; ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        prefix = h.cumsum(1) / attention_mask.cumsum(1).clamp(min=1).unsqueeze(-1)
        return self.head(torch.tanh(self.mix(prefix)) + h)


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, P + C), generator=g)
    attn = torch.ones(n, P + C, dtype=torch.long)
    attn[0, :2] = 0  # left padding of a prompt
    loss_mask = torch.ones(n, C, dtype=torch.long)
    loss_mask[1, 3:] = 0  # a completion that ended early
    attn[:, P:] = loss_mask
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "advantages": torch.randn(n, generator=g),
    }


def _brute_force(model: nn.Module, cfg: SequenceLossConfig, train: dict, target: dict) -> torch.Tensor:
    """-<grad f_seq, grad L_i> with f_seq written out by hand and one backward pass per pair."""
    params = [p for p in model.parameters()]
    logits = model(target["input_ids"], target["attention_mask"])[:, P - 1 : -1] / cfg.temperature
    logp = torch.log_softmax(logits, -1).gather(-1, target["input_ids"][:, P:, None]).squeeze(-1)
    f = ((logp * target["loss_mask"]).sum(1) * target["advantages"]).mean()
    gf = torch.autograd.grad(f, params)
    named = dict(model.named_parameters())
    loss = pair_loss_fn(model, cfg)
    out = []
    for i in range(train["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in train.items()}
        gi = torch.autograd.grad(loss(named, row).sum(), params)
        out.append(-torch.stack([(a * b).sum() for a, b in zip(gf, gi, strict=True)]).sum())
    return torch.stack(out)


CONFIGS = [
    SequenceLossConfig("grpo"),
    SequenceLossConfig("bnpo", temperature=0.7),
    SequenceLossConfig("dr_grpo"),
    SequenceLossConfig("dapo", beta=0.1),
    SequenceLossConfig("cispo", epsilon_high=3.0),
    SequenceLossConfig("luspo", importance_sampling_level="sequence"),
    SequenceLossConfig("grpo", beta=0.2, bias_correction_kl=True, delta=1.5),
    SequenceLossConfig("rloo"),
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-b{c.beta}-{c.importance_sampling_level}"
)
def test_pair_scores_match_per_pair_autograd(cfg: SequenceLossConfig) -> None:
    model = TinyLM()
    train, target = _batch(6, 1), _batch(4, 2)
    train["scale"] = pair_scales(
        cfg.loss_type,
        train["loss_mask"],
        micro_batch_size=3,
        grad_accum_steps=2,
        max_completion_length=C,
        num_items_in_batch=train["loss_mask"].sum(),
    )
    if cfg.beta:
        train["ref_logps"] = -torch.rand(6, C) * 3
    task = sequence_task(model, cfg)
    direction = target_direction(task, target)
    expected = _brute_force(model, cfg, train, target)
    jvp = pair_scores(task, train, direction, method="jvp")
    loop = pair_scores(task, train, direction, method="loop")
    torch.testing.assert_close(jvp, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loop, expected, rtol=1e-4, atol=1e-7)
    assert expected.abs().max() > 1e-4  # a test of something


def test_old_logps_off_policy_ratio_is_used() -> None:
    """With old log-probs away from the current ones the clipped branch must switch off gradients."""
    model, cfg = TinyLM(), SequenceLossConfig("grpo", epsilon_low=0.1, epsilon_high=0.1)
    train = _batch(4, 3)
    train["scale"] = torch.ones(4)
    with torch.no_grad():
        logp = completion_logprobs(model, dict(model.named_parameters()), train, 1.0)
    train["advantages"] = torch.tensor([1.0, 1.0, -1.0, 0.5])
    train["old_logps"] = logp - 1.0  # ratio e > 1 + eps: positive-advantage tokens are clipped
    task = sequence_task(model, cfg)
    scores = pair_scores(task, train, target_direction(task, _batch(4, 4)))
    assert scores[0] == 0 and scores[1] == 0 and scores[3] == 0
    assert scores[2] != 0


def test_pair_scales_by_hand() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kw = {"micro_batch_size": 2, "grad_accum_steps": 2, "num_processes": 1}
    torch.testing.assert_close(pair_scales("grpo", mask, **kw), torch.tensor([1 / 12, 1 / 4]))
    torch.testing.assert_close(pair_scales("bnpo", mask, **kw), torch.tensor([1 / 8, 1 / 8]))
    torch.testing.assert_close(
        pair_scales("dr_grpo", mask, max_completion_length=4, **kw), torch.tensor([1 / 16, 1 / 16])
    )
    torch.testing.assert_close(
        pair_scales("dapo", mask, num_items_in_batch=torch.tensor(4), steps_per_generation=2, **kw),
        torch.tensor([1 / 4, 1 / 4]),
    )
    torch.testing.assert_close(pair_scales("rloo", mask, **kw), torch.tensor([1 / 4, 1 / 4]))


def test_fallback_warns_and_stays_exact() -> None:
    class NoJvp(torch.autograd.Function):  # works with reverse mode, has no forward-mode rule
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    class Wrapped(TinyLM):
        def forward(self, input_ids, attention_mask):
            return NoJvp.apply(super().forward(input_ids, attention_mask))

    model, cfg = Wrapped(), SequenceLossConfig("grpo")
    train = _batch(3, 5)
    train["scale"] = torch.ones(3)
    task = sequence_task(model, cfg)
    direction = target_direction(task, _batch(2, 6))
    with pytest.warns(RuntimeWarning, match="falling back"):
        scores = pair_scores(task, train, direction)
    torch.testing.assert_close(scores, pair_scores(task, train, direction, method="loop"))


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="loss_type: got 'sapo'"):
        SequenceLossConfig("sapo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        SequenceLossConfig("grpo", importance_sampling_level="batch")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        pair_scales("dapo", torch.ones(2, 3), micro_batch_size=2)
    with pytest.raises(ValueError, match="method"):
        pair_scores(sequence_task(TinyLM(), SequenceLossConfig("grpo")), {}, {}, method="ghost")
