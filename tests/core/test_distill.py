"""Distilled embeddings: a teacher that is an exact inner product is recovered (recall@k = 1)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rlattr.core.methods import Attributor, DistilledEmbedding, GradDot
from rlattr.core.methods.distill import recall_at_k
from rlattr.core.task import Batch, Task
from rlattr.errors import RlattrError
from rlattr.testing.supervised import classification_task, make_model

GEN = torch.Generator().manual_seed(0)
A = torch.randn(4, 6, generator=GEN, dtype=torch.float64)  # query embedding of known form
B = torch.randn(4, 6, generator=GEN, dtype=torch.float64)  # record embedding


class InnerProductTeacher(Attributor):
    """score(q, i) = (A x_q) . (B x_i): the teacher an embedding can represent exactly."""

    def cache(self, train: Batch) -> InnerProductTeacher:
        self._train = train["x"] @ B.T
        return self

    def attribute(self, query: Batch) -> Tensor:
        return (query["x"] @ A.T) @ self._require_cache().T


def _task() -> Task:
    return Task(nn.Linear(6, 1).double(), lambda p, b: b["x"].sum(1))


def _x(n: int) -> dict[str, Tensor]:
    return {"x": torch.randn(n, 6, generator=GEN, dtype=torch.float64)}


def test_recall_at_k_counts_the_shared_top_k_by_hand():
    teacher = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    student = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert recall_at_k(student, teacher, 2) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert recall_at_k(student, teacher, 3) == pytest.approx((2 / 3 + 3 / 3) / 2)
    with pytest.raises(RlattrError, match="k: got 6; supported: 1 <= k <= 5"):
        recall_at_k(student, teacher, 6)


def test_an_exact_inner_product_teacher_is_recovered_on_new_queries():
    train, fit, held_out = _x(200), _x(60), _x(30)
    teacher = InnerProductTeacher(_task())
    student = DistilledEmbedding(
        teacher, lambda b: b["x"], dim=4, hidden=0, steps=1500, lr=3e-2, temperature=0.3, mse_weight=1.0
    )
    student.cache(train).fit(fit)
    truth = teacher.attribute(held_out)
    assert recall_at_k(student.attribute(held_out), truth, 10) == 1.0
    values, idx = student.search(held_out, 10)
    assert idx.shape == (30, 10)
    torch.testing.assert_close(values, student.attribute(held_out).gather(1, idx))
    assert set(idx[0].tolist()) == set(truth[0].topk(10).indices.tolist())


def test_a_gradient_teacher_is_distilled_on_digits_features():
    """Grad-Dot of logistic regression is bilinear in (p - e_y) (x) [x, 1]: an embedding can learn it."""
    torch.manual_seed(0)
    model = make_model("logreg", n_in=6, n_out=3).double()
    with torch.no_grad():
        model[0].weight.normal_(0, 0.5)
    task = classification_task(model)

    def feats(b: Batch) -> Tensor:
        err = torch.softmax(model(b["x"]), 1) - nn.functional.one_hot(b["y"], 3)
        xb = torch.cat([b["x"], torch.ones(len(b["x"]), 1, dtype=b["x"].dtype)], 1)
        return (err[:, :, None] * xb[:, None, :]).flatten(1).detach()

    def batch(n: int) -> dict[str, Tensor]:
        return {
            "x": torch.randn(n, 6, generator=GEN, dtype=torch.float64),
            "y": torch.randint(0, 3, (n,), generator=GEN),
        }

    train, fit, held_out = batch(150), batch(80), batch(20)
    student = DistilledEmbedding(GradDot(task), feats, dim=21, hidden=0, steps=1500, lr=3e-2, mse_weight=1.0)
    student.cache(train).fit(fit)
    assert recall_at_k(student.attribute(held_out), GradDot(task).cache(train).attribute(held_out), 10) >= 0.9


def test_arguments_are_validated():
    teacher = InnerProductTeacher(_task())
    with pytest.raises(RlattrError, match="teacher: got str; supported: an Attributor"):
        DistilledEmbedding("tracin", lambda b: b["x"])  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="dim, hidden, steps: got 0, 64, 500"):
        DistilledEmbedding(teacher, lambda b: b["x"], dim=0)
    with pytest.raises(RlattrError, match="lr, temperature: got 0.01, 0.0"):
        DistilledEmbedding(teacher, lambda b: b["x"], temperature=0.0)
    with pytest.raises(
        RlattrError, match=r"features: returned \(5,\) for 5 records; supported: Tensor\[n, f\]"
    ):
        DistilledEmbedding(teacher, lambda b: b["x"].sum(1)).cache(_x(5))
    student = DistilledEmbedding(teacher, lambda b: b["x"], steps=1).cache(_x(5))
    with pytest.raises(RuntimeError, match="fit"):
        student.attribute(_x(2))
    with pytest.raises(RlattrError, match="k: got 9; supported: 1 <= k <= 5"):
        student.fit(_x(3)).search(_x(2), 9)
