"""InfluenceFunction: explicit vs the closed form of logistic regression; CG, LiSSA vs explicit;
EK-FAC vs a numpy re-derivation; Gauss-Newton curvature; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rlattr.core.methods import InfluenceFunction, self_influence
from rlattr.core.methods.hessian import ObjectiveHessian
from rlattr.core.methods.lissa import LiSSASolver
from rlattr.testing.supervised import ce_of_logits, classification_task, per_record_logits
from tests.core._tda import logreg_closed_form, logreg_problem, mlp_problem


@pytest.fixture(scope="module")
def lr():
    return logreg_problem()


def test_explicit_equals_closed_form(lr):
    g, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    gq, _ = logreg_closed_form(lr, lr.query["x"], lr.query["y"])
    hess = h.mean(0) + lr.l2 * np.eye(h.shape[1])
    expected = gq @ np.linalg.solve(hess, g.T)
    got = InfluenceFunction(lr.task, strategy="explicit", l2=lr.l2).cache(lr.train).attribute(lr.query)
    assert got.shape == (4, 60)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_cg_matches_explicit(lr):
    explicit = InfluenceFunction(lr.task, l2=lr.l2).cache(lr.train).attribute(lr.query)
    cg = InfluenceFunction(lr.task, strategy="cg", l2=lr.l2, max_iter=200, tol=1e-10).cache(lr.train)
    got = cg.attribute(lr.query)
    assert float((got - explicit).abs().max() / explicit.abs().max()) < 1e-6


@pytest.fixture(scope="module")
def damped(lr):
    """Explicit scores with damping 0.5 and the Hessian's largest eigenvalue (LiSSA converges fast)."""
    top = float(torch.linalg.eigvalsh(ObjectiveHessian(lr.task, lr.train, shift=lr.l2 + 0.5).dense())[-1])
    return InfluenceFunction(lr.task, l2=lr.l2, damping=0.5).cache(lr.train).attribute(lr.query), top


def test_lissa_matches_explicit(lr, damped):
    explicit, top = damped
    lissa = InfluenceFunction(lr.task, strategy="lissa", l2=lr.l2, damping=0.5, depth=80, scale=1.2 * top)
    got = lissa.cache(lr.train).attribute(lr.query)
    assert float((got - explicit).abs().max() / explicit.abs().max()) < 1e-4


def test_stochastic_lissa_is_close(lr, damped):
    explicit, top = damped
    # no scale given: LiSSA takes 1.5 x a power-iteration estimate of H's top eigenvalue
    lissa = InfluenceFunction(
        lr.task, strategy="lissa", l2=lr.l2, damping=0.5, depth=60, batch_size=30, seed=3
    )
    scores = lissa.cache(lr.train).attribute(lr.query)
    corr = np.corrcoef(scores.flatten().numpy(), explicit.flatten().numpy())[0, 1]
    assert corr > 0.95
    solver = lissa.solver
    assert isinstance(solver, LiSSASolver)
    assert solver.scale == pytest.approx(1.5 * top, rel=1e-3)  # top: from a dense eigendecomposition


def _ekfac_numpy(
    model: nn.Linear, x: np.ndarray, grads: np.ndarray, ds: np.ndarray, shift: float, v: np.ndarray
):
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    _, q_a = np.linalg.eigh(a.T @ a / len(a))
    _, q_s = np.linalg.eigh(ds.T @ ds / len(ds))
    c, dim = model.weight.shape
    mats = np.concatenate([grads[:, : c * dim].reshape(-1, c, dim), grads[:, c * dim :, None]], axis=2)
    lam = np.mean([(q_s.T @ m @ q_a) ** 2 for m in mats], axis=0)
    vm = np.concatenate([v[: c * dim].reshape(c, dim), v[c * dim :, None]], axis=1)
    out = q_s @ ((q_s.T @ vm @ q_a) / (lam + shift)) @ q_a.T
    return np.concatenate([out[:, :dim].reshape(-1), out[:, dim]])


def test_ekfac_linear_matches_numpy(lr):
    x, y = lr.train["x"].numpy(), lr.train["y"].numpy()
    g, _ = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    with torch.no_grad():
        prob = torch.softmax(lr.model(lr.train["x"]), 1).numpy()
    ds = prob - np.eye(3)[y]  # d CE / d logits
    attr = InfluenceFunction(lr.task, strategy="ekfac", l2=lr.l2).cache(lr.train)
    v = np.random.default_rng(0).normal(size=g.shape[1])
    got = attr.inverse_hvp(torch.tensor(v)[None])[0].numpy()
    np.testing.assert_allclose(got, _ekfac_numpy(lr.model[0], x, g, ds, lr.l2, v), rtol=1e-7, atol=1e-9)


def test_ekfac_conv2d_1x1_equals_linear(lr):
    lin = lr.model[0]
    conv = nn.Conv2d(lin.in_features, lin.out_features, 1).double()
    with torch.no_grad():
        conv.weight.copy_(lin.weight[:, :, None, None])
        conv.bias.copy_(lin.bias)
    model = nn.Sequential(conv, nn.Flatten())
    task = classification_task(model)
    train = {"x": lr.train["x"][:, :, None, None], "y": lr.train["y"]}
    query = {"x": lr.query["x"][:, :, None, None], "y": lr.query["y"]}
    conv_scores = InfluenceFunction(task, strategy="ekfac", l2=lr.l2).cache(train).attribute(query)
    lin_scores = InfluenceFunction(lr.task, strategy="ekfac", l2=lr.l2).cache(lr.train).attribute(lr.query)
    np.testing.assert_allclose(conv_scores.numpy(), lin_scores.numpy(), rtol=1e-7)


def test_ekfac_conv2d_3x3_runs_and_is_symmetric():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)
    ).double()
    task = classification_task(model)
    train = {"x": torch.randn(20, 2, 4, 4, dtype=torch.float64), "y": torch.randint(0, 2, (20,))}
    attr = InfluenceFunction(task, strategy="ekfac", damping=1e-2).cache(train)
    eye = torch.eye(task.num_params, dtype=torch.float64)
    inv = attr.inverse_hvp(eye)
    assert torch.allclose(inv, inv.T, atol=1e-8)
    assert float(torch.linalg.eigvalsh(inv).min()) > 0


def test_ggn_curvature_equals_hessian_for_glm_and_is_psd_for_mlp(lr):
    curv = {"output": per_record_logits(lr.model), "output_loss": ce_of_logits}
    h = ObjectiveHessian(lr.task, lr.train).dense()
    ggn = ObjectiveHessian(lr.task, lr.train, **curv).dense()
    assert torch.allclose(h, ggn, atol=1e-12)
    mlp = mlp_problem()
    ggn_mlp = ObjectiveHessian(
        mlp.task, mlp.train, output=per_record_logits(mlp.model), output_loss=ce_of_logits
    )
    assert float(torch.linalg.eigvalsh(ggn_mlp.dense()).min()) > -1e-10


def test_self_influence_is_diagonal(lr):
    attr = InfluenceFunction(lr.task, l2=lr.l2).cache(lr.train)
    full = attr.attribute(lr.train)
    np.testing.assert_allclose(self_influence(attr).numpy(), torch.diagonal(full).numpy(), rtol=1e-8)


def test_singular_hessian_without_damping_is_refused(lr):
    # multinomial logits are invariant to a shift common to all classes: H is singular without l2
    with pytest.raises(ValueError, match="damping"):
        InfluenceFunction(lr.task, strategy="explicit").cache(lr.train)
    with pytest.raises(ValueError, match="damping"):
        InfluenceFunction(lr.task, strategy="ekfac").cache({"x": lr.train["x"][:1], "y": lr.train["y"][:1]})


def test_bad_arguments_are_named(lr):
    with pytest.raises(ValueError, match="strategy"):
        InfluenceFunction(lr.task, strategy="newton")
    with pytest.raises(ValueError, match="options"):
        InfluenceFunction(lr.task, strategy="cg", l2=lr.l2, depth=3).cache(lr.train)
    with pytest.raises(ValueError, match="l2"):
        InfluenceFunction(lr.task, l2=-1.0).cache(lr.train)
    attr = InfluenceFunction(lr.task, l2=lr.l2).cache(lr.train)
    with pytest.raises(ValueError, match="query"):
        attr.attribute({"x": lr.query["x"][:, :5], "y": lr.query["y"]})
    with pytest.raises(ValueError, match="query"):
        attr.score_vectors([torch.zeros(2, 5, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="cache"):
        InfluenceFunction(lr.task, l2=lr.l2).attribute(lr.query)


def test_self_influence_flags_flipped_labels():
    from rlattr.eval.metrics import mislabel_auc
    from rlattr.testing.supervised import load_digits_split, make_model, train_classifier
    from tests.core._tda import FEATURES

    data = load_digits_split(400, seed=1, dtype=torch.float64)
    x, y = data.x_train[:100, FEATURES], data.y_train[:100] % 3
    flipped = torch.zeros(100, dtype=torch.bool)
    flipped[::10] = True
    y = torch.where(flipped, (y + 1) % 3, y)
    model = train_classifier(make_model("logreg", n_in=8, n_out=3).double(), x, y, l2=0.05)
    attr = InfluenceFunction(classification_task(model), l2=0.05).cache({"x": x, "y": y})
    assert mislabel_auc(self_influence(attr), flipped) > 0.65  # 0.73 here; chance is 0.5


def test_target_sign_convention(lr):
    # a target to lower (mean query loss) and its negative to raise give the same scores, equal to
    # the mean over query records of the per-record (no target) scores
    from rlattr.core.task import Task
    from rlattr.testing.supervised import per_record_ce

    ce = per_record_ce(lr.model)
    lower = Task(lr.model, ce, target=lambda p, b: ce(p, b).mean(), target_goal="lower")
    raise_ = Task(lr.model, ce, target=lambda p, b: -ce(p, b).mean(), target_goal="raise")
    per_record = InfluenceFunction(lr.task, l2=lr.l2).cache(lr.train).attribute(lr.query)
    for task in (lower, raise_):
        got = InfluenceFunction(task, l2=lr.l2).cache(lr.train).attribute(lr.query)
        assert got.shape == (1, 60)
        np.testing.assert_allclose(got[0].numpy(), per_record.mean(0).numpy(), rtol=1e-9)
