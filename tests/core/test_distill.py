"""Distilled embeddings: a teacher that is an exact inner product is recovered (recall@k = 1)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rlattr.core.methods import Attributor, DistilledEmbedding, GradDot
from rlattr.core.methods.distill import (
    factor_query_map,
    factored_embed,
    gradient_features,
    recall_at_k,
    reduced_rank_fit,
    ridge_solve,
)
from rlattr.core.projection import RandomProjection
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


def test_ridge_solve_matches_least_squares_in_primal_and_dual_form():
    x, y = (
        torch.randn(30, 6, generator=GEN, dtype=torch.float64),
        torch.randn(30, 2, generator=GEN, dtype=torch.float64),
    )
    torch.testing.assert_close(ridge_solve(x, y, 0.0), torch.linalg.lstsq(x, y).solution)
    wide = torch.randn(4, 9, generator=GEN, dtype=torch.float64)  # N < f: the minimum-norm interpolant
    target = torch.randn(4, 2, generator=GEN, dtype=torch.float64)
    torch.testing.assert_close(ridge_solve(wide, target, 0.0), torch.linalg.pinv(wide) @ target)
    lam = 0.5 * float((x * x).sum(0).mean())  # ridge 0.5 on the mean diagonal of x^T x
    ref = torch.linalg.solve(x.T @ x + (lam + 1e-12) * torch.eye(6, dtype=torch.float64), x.T @ y)
    torch.testing.assert_close(ridge_solve(x, y, 0.5), ref)


def test_reduced_rank_fit_recovers_a_rank_d_bilinear_teacher_and_is_the_best_rank_d_fit():
    fq, fr = _x(50)["x"], _x(40)["x"]
    teacher = (fq @ A.T) @ (fr @ B.T).T  # rank 4
    q_map, r_map = reduced_rank_fit(fq, teacher, fr, dim=4, ridge=0.0)
    torch.testing.assert_close((fq @ q_map) @ (fr @ r_map).T, teacher)
    q2, r2 = reduced_rank_fit(fq, teacher, fr, dim=2, ridge=0.0)  # per-row weights: the rows' scale
    w = 1 / teacher.std(1, keepdim=True)
    u, s, vh = torch.linalg.svd(teacher * w)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young on the weighted scores
    torch.testing.assert_close((fq @ q2) @ (fr @ r2).T * w, best)


def test_the_ridge_solver_reproduces_a_bilinear_teacher_on_held_out_queries_and_serves_in_float32():
    train, fit, held_out = _x(200), _x(60), _x(30)
    teacher = InnerProductTeacher(_task())
    student = DistilledEmbedding(teacher, lambda b: b["x"], dim=4, solver="ridge", ridge=0.0)
    student.cache(train).fit(fit)
    assert student.history == [] and student.hidden == 0  # closed form, no ListNet steps by default
    truth = teacher.attribute(held_out)
    torch.testing.assert_close(student.attribute(held_out), truth)
    fast = student.astype(torch.float32).attribute(held_out)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), truth, rtol=1e-4, atol=1e-4)
    assert recall_at_k(fast.double(), truth, 10) == 1.0


def test_gradient_features_are_the_per_record_and_query_gradients_and_their_projection():
    torch.manual_seed(0)
    model = make_model("logreg", n_in=5, n_out=3).double()
    with torch.no_grad():
        model[0].weight.normal_(0, 0.5)
    task = classification_task(model)
    batch = {
        "x": torch.randn(7, 5, generator=GEN, dtype=torch.float64),
        "y": torch.randint(0, 3, (7,), generator=GEN),
    }
    rows = []
    for i in range(7):  # the loss gradient of each record by autograd, flattened in parameter order
        loss = nn.functional.cross_entropy(model(batch["x"][i : i + 1]), batch["y"][i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    ref = torch.stack(rows)
    torch.testing.assert_close(gradient_features(task)(batch), ref)
    torch.testing.assert_close(gradient_features(task, query=True)(batch), ref)  # no target: the loss
    proj = RandomProjection(task.num_params, 4, seed=3).matrix().double()
    torch.testing.assert_close(gradient_features(task, proj_dim=4, seed=3)(batch), ref @ proj)
    with pytest.raises(RlattrError, match="proj_dim: got 0; supported"):
        gradient_features(task, proj_dim=0)


def test_ridge_options_are_validated():
    teacher = InnerProductTeacher(_task())
    with pytest.raises(RlattrError, match="solver: got 'svd'; supported: \\('listnet', 'ridge'\\)"):
        DistilledEmbedding(teacher, lambda b: b["x"], solver="svd")  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="hidden: got 8 with solver='ridge'; supported: 0"):
        DistilledEmbedding(teacher, lambda b: b["x"], solver="ridge", hidden=8)
    with pytest.raises(RlattrError, match="mse_weight, ridge: got 0.1, -1.0"):
        DistilledEmbedding(teacher, lambda b: b["x"], solver="ridge", ridge=-1.0)


def test_factored_query_map_matches_the_dense_map_and_counts_rank() -> None:
    gen = torch.Generator().manual_seed(3)
    shapes, d, m = [(4, 5), (3, 6)], 7, 9
    q_map = torch.randn(4 * 5 + 3 * 6, d, generator=gen, dtype=torch.float64)
    parts = [(torch.randn(m, o, generator=gen, dtype=torch.float64),
              torch.randn(m, i, generator=gen, dtype=torch.float64)) for o, i in shapes]  # fmt: skip
    feats = torch.cat([(dl[:, :, None] * a[:, None, :]).flatten(1) for dl, a in parts], 1)  # vec(delta (x) a)
    exact = factor_query_map(q_map, shapes, rank=5)  # full rank of both layers
    assert torch.allclose(factored_embed(parts, exact), feats @ q_map, atol=1e-10)
    one = factor_query_map(q_map, shapes, rank=1)
    assert [tuple(u.shape) + tuple(v.shape) for u, v in one] == [(4, d, 1, 5, d, 1), (3, d, 1, 6, d, 1)]
    # rank 1 by hand: the top singular pair of each layer's slice of each column
    expected = torch.zeros(m, d, dtype=torch.float64)
    start = 0
    for (o, i), (dl, a) in zip(shapes, parts, strict=True):
        for k in range(d):
            u, s, vh = torch.linalg.svd(q_map[start : start + o * i, k].reshape(o, i))
            expected[:, k] += s[0] * (dl @ u[:, 0]) * (a @ vh[0])
        start += o * i
    assert torch.allclose(factored_embed(parts, one), expected, atol=1e-10)
    with pytest.raises(RlattrError, match=r"shapes: cover 20 rows; supported: the rows of q_map \(38, 7\)"):
        factor_query_map(q_map, shapes[:1], rank=1)
    with pytest.raises(RlattrError, match="rank: got 0; supported: >= 1"):
        factor_query_map(q_map, shapes, rank=0)
