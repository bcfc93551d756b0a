"""AirRep-style attribution on a linear-datamodel toy, pooling against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rlattr.core.methods import AirRep, Attributor, DistilledEmbedding
from rlattr.core.methods.representation import pairwise_loss, pooled_scores, rank_corr_loss
from rlattr.core.task import Batch, Task
from rlattr.errors import RlattrError
from rlattr.eval.groundtruth import subset_masks
from rlattr.eval.metrics import pearson, spearman

F = 5


def _toy(seed: int = 0) -> tuple[Task, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """True effect of subset S on query q: sum_{i in S} q^T W x_i (W of rank 3) plus 1% noise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(F, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, F, generator=gen, dtype=torch.float64
    )
    train = {"x": torch.randn(60, F, generator=gen, dtype=torch.float64)}
    fit = {"x": torch.randn(40, F, generator=gen, dtype=torch.float64)}
    held = {"x": torch.randn(20, F, generator=gen, dtype=torch.float64)}
    task = Task(nn.Linear(F, 1).double(), lambda p, b: b["x"].sum(1))
    return task, train, fit, held, w


def _effects(
    masks: Tensor, queries: dict[str, Tensor], train: dict[str, Tensor], w: Tensor, seed: int
) -> Tensor:
    tau = queries["x"] @ w @ train["x"].T  # [m, n]
    clean = masks.double() @ tau.T
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return clean + 0.01 * clean.std() * noise


def test_pooling_matches_a_hand_loop_and_uniform_attention_is_additive():
    gen = torch.Generator().manual_seed(1)
    scores, gate = torch.randn(3, 6, generator=gen), torch.randn(6, generator=gen)
    masks = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = pooled_scores(scores, gate, masks)
    for g, row in enumerate(masks):
        idx = row.nonzero().squeeze(1)
        a = torch.exp(gate[idx]) / torch.exp(gate[idx]).sum()
        torch.testing.assert_close(got[:, g], len(idx) * (scores[:, idx] * a).sum(1))
    torch.testing.assert_close(pooled_scores(scores, torch.zeros(6), masks), scores @ masks.float().T)


def test_learned_group_scores_rank_new_subsets_like_the_true_effect():
    task, train, fit, held, w = _toy()
    masks = subset_masks(60, 300, 0.5, seed=0)
    air = AirRep(task, lambda b: b["x"], dim=F, hidden=0, steps=800, lr=3e-2).cache(train)
    air.fit(fit, masks, _effects(masks, fit, train, w, seed=0))
    new = subset_masks(60, 100, 0.3, seed=9)  # unseen subsets, another size, unseen queries
    truth = _effects(new, held, train, w, seed=1).T.numpy()
    rho = spearman(air.group_scores(held, new).numpy(), truth)
    assert float(np.mean(rho)) > 0.9
    tau = (held["x"] @ w @ train["x"].T).numpy()
    assert float(np.mean(pearson(air.attribute(held).numpy(), tau))) > 0.9
    singles = torch.eye(60, dtype=torch.bool)[:4]
    torch.testing.assert_close(air.group_scores(held, singles), air.attribute(held)[:, :4])


def test_arguments_are_validated():
    task, train, fit, _, w = _toy()
    with pytest.raises(RlattrError, match="dim, hidden, steps: got 8, 64, 0"):
        AirRep(task, lambda b: b["x"], dim=8, steps=0)
    air = AirRep(task, lambda b: b["x"], steps=1).cache(train)
    masks = subset_masks(60, 5, 0.5)
    with pytest.raises(
        RlattrError, match=r"masks: got torch.float32 \(5, 60\); supported: bool Tensor\[M, 60\]"
    ):
        air.fit(fit, masks.float(), torch.zeros(5, 40))
    with pytest.raises(
        RlattrError, match=r"effects: got shape \(5, 3\); supported: finite Tensor\[M, m\] = \(5, 40\)"
    ):
        air.fit(fit, masks, torch.zeros(5, 3))
    with pytest.raises(RuntimeError, match="fit"):
        air.attribute(fit)
    air.fit(fit, masks, _effects(masks, fit, train, w, seed=0))
    with pytest.raises(RlattrError, match=r"groups: got torch.bool \(2, 59\)"):
        air.group_scores(fit, torch.ones(2, 59, dtype=torch.bool))


class _BilinearTeacher(Attributor):
    """score(q, i) = q^T W x_i for a given W: a stand-in for an imperfect gradient method."""

    def __init__(self, task: Task, w: Tensor) -> None:
        super().__init__(task)
        self.w = w

    def cache(self, train: Batch) -> _BilinearTeacher:
        self._train = train["x"]
        return self

    def attribute(self, query: Batch) -> Tensor:
        return query["x"] @ self.w @ self._require_cache().T


def test_a_distilled_start_is_kept_at_zero_steps_and_corrected_by_subset_effects():
    task, train, fit, held, w = _toy()
    noise = torch.randn(F, F, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teacher = _BilinearTeacher(task, w + 0.8 * w.norm() / F * noise)  # right direction, wrong details
    start = (
        DistilledEmbedding(teacher, lambda b: b["x"], dim=F, solver="ridge", ridge=0.0).cache(train).fit(fit)
    )
    masks = subset_masks(60, 300, 0.5, seed=0)
    effects = _effects(masks, fit, train, w, seed=0)
    kept = AirRep(task, lambda b: b["x"], steps=0, init=start).cache(train).fit(fit, masks, effects)
    torch.testing.assert_close(kept.attribute(held), start.attribute(held))
    fast = kept.astype(torch.float32).attribute(held)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), start.attribute(held), rtol=1e-4, atol=1e-4)
    tuned = (
        AirRep(task, lambda b: b["x"], steps=300, lr=1e-2, init=start).cache(train).fit(fit, masks, effects)
    )
    new = subset_masks(60, 100, 0.5, seed=9)
    truth = _effects(new, held, train, w, seed=1).T.numpy()

    def rank_corr(scores: Tensor) -> float:
        pred = (scores @ new.double().T).numpy()
        return float(np.mean([spearman(pred[j], truth[j]) for j in range(len(truth))]))

    before, after = rank_corr(start.attribute(held)), rank_corr(tuned.attribute(held))
    assert after > before + 0.1 and after > 0.9, (before, after)
    with pytest.raises(RlattrError, match="init: got DistilledEmbedding; supported: None or a fitted"):
        AirRep(task, lambda b: b["x"], init=DistilledEmbedding(teacher, lambda b: b["x"]))


def test_rank_objectives_against_hand_values():
    target = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)  # ranks 1, 0, 3, 2
    assert float(rank_corr_loss(torch.tensor([[1.0, 0.0, 3.0, 2.0]]).double(), target, 1.0)) == pytest.approx(
        -1.0
    )
    assert float(rank_corr_loss(torch.tensor([[2.0, 3.0, 0.0, 1.0]]).double(), target, 1.0)) == pytest.approx(
        1.0
    )
    pred = torch.tensor([[0.2, 0.1, 0.9, -0.4]], dtype=torch.float64)
    expected = -np.corrcoef(pred[0].numpy(), [1, 0, 3, 2])[0, 1]
    assert float(rank_corr_loss(pred, target, 1.0)) == pytest.approx(expected)
    # z = (-1, 0, 1); pairs with target_s > target_t: (1, 0), (2, 0), (2, 1) -> z gaps 1, 2, 1
    got = pairwise_loss(
        torch.tensor([[0.0, 1.0, 2.0]]).double(), torch.tensor([[0.0, 1.0, 2.0]]).double(), 0.5
    )
    hand = (2 * math.log1p(math.exp(-1 / 0.5)) + math.log1p(math.exp(-2 / 0.5))) / 3
    assert float(got) == pytest.approx(hand)
    with pytest.raises(
        RlattrError, match=r"objective: got 'mse'; supported: \['listnet', 'pairwise', 'rank_corr'\]"
    ):
        AirRep(_toy()[0], lambda b: b["x"], objective="mse")


# pairwise costs subsets^2 per query and step: fewer label subsets keep it to seconds
@pytest.mark.parametrize(("objective", "n_subsets"), [("rank_corr", 300), ("pairwise", 100)])
def test_rank_objectives_correct_a_distilled_start(objective: str, n_subsets: int):
    task, train, fit, held, w = _toy()
    noise = torch.randn(F, F, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teacher = _BilinearTeacher(task, w + 0.8 * w.norm() / F * noise)
    start = (
        DistilledEmbedding(teacher, lambda b: b["x"], dim=F, solver="ridge", ridge=0.0).cache(train).fit(fit)
    )
    masks = subset_masks(60, n_subsets, 0.5, seed=0)
    effects = _effects(masks, fit, train, w, seed=0)
    tuned = AirRep(task, lambda b: b["x"], steps=300, lr=1e-2, init=start, objective=objective)
    tuned.cache(train).fit(fit, masks, effects)
    new = subset_masks(60, 100, 0.5, seed=9)
    truth = _effects(new, held, train, w, seed=1).T.numpy()

    def rank_corr(scores: Tensor) -> float:
        pred = (scores @ new.double().T).numpy()
        return float(np.mean([spearman(pred[j], truth[j]) for j in range(len(truth))]))

    before, after = rank_corr(start.attribute(held)), rank_corr(tuned.attribute(held))
    assert after > before + 0.1 and after > 0.9, (before, after)
