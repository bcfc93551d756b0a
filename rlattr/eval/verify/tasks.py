"""Retraining functions ``retrain(mask: bool Tensor[n]) -> float`` for the Verifier.

* :func:`digits_retrain` / :func:`digits_margins`: logistic regression on scikit-learn's digits
  (:mod:`rlattr.testing.supervised`) trained on the kept records by a fixed full-batch schedule,
  many subsets at once; the target is the margin of one test image.
* :func:`ppo_round_retrain`: one recorded PPO round re-run from theta(k) on the kept records
  (:func:`rlattr.eval.rl_validity.retrain_subset`, the round's hyperparameters, a fixed minibatch
  seed so that the target is a deterministic function of the subset), the target
  (:meth:`RoundContext.target_value`) evaluated at the resulting theta.
* :func:`calibrated_claim`: turn attribution scores of unknown scale (grad-dot, TracIn ...) into a
  datamodel claim: the Prover fits ``b + a * scores`` on its own retrainings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlattr.errors import RlattrError
from rlattr.eval.rl_validity import RoundContext, retrain_subset
from rlattr.eval.verify.protocol import Claim, Retrain
from rlattr.testing.supervised import SupervisedData


def _check_mask(mask: Tensor, n: int) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise RlattrError(f"mask: got {mask.dtype} {tuple(mask.shape)}; supported: a bool Tensor[{n}]")
    return mask


def digits_margins(
    data: SupervisedData, masks: Tensor, test_index: int = 0, *, l2: float = 1e-2, steps: int = 300
) -> Tensor:
    """``Tensor[B]``: margin ``log p_y / (1 - p_y)`` of test image ``test_index`` under multinomial
    logistic regression trained on the records kept by each row of ``masks: Tensor[B, n]`` bool.

    Training: ``steps`` full-batch Nesterov steps from zero on ``mean_kept CE + (l2 / 2) ||W||^2``
    (bias unpenalised), step 1 / L with L = 0.75 lambda_max(X^T X / n) + l2, in float64, all rows at
    once. A fixed, deterministic procedure: the same mask gives the same margin, alone or in a batch.
    """
    x = data.x_train.double()
    n = int(x.shape[0])
    if masks.dim() != 2 or masks.dtype != torch.bool or masks.shape[1] != n:
        raise RlattrError(f"masks: got {masks.dtype} {tuple(masks.shape)}; supported: a bool Tensor[B, {n}]")
    if not isinstance(test_index, int) or not 0 <= test_index < int(data.x_test.shape[0]):
        raise RlattrError(f"test_index: got {test_index!r}; supported: 0 .. {int(data.x_test.shape[0]) - 1}")
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    classes = int(data.y_train.max()) + 1
    onehot = torch.nn.functional.one_hot(data.y_train, classes).double()
    lr = 1.0 / (0.75 * float(torch.linalg.eigvalsh(xb.T @ xb / n).max()) + l2)
    w = masks.double() / masks.double().sum(1, keepdim=True).clamp_min(1.0)
    decay = torch.ones(xb.shape[1], 1, dtype=torch.float64)
    decay[-1] = 0.0
    weights = torch.zeros(masks.shape[0], xb.shape[1], classes, dtype=torch.float64)
    look, t = weights.clone(), 1.0
    for _ in range(steps):
        p = torch.einsum("nd,bdc->bnc", xb, look).softmax(-1)
        grad = torch.einsum("nd,bnc->bdc", xb, (p - onehot) * w[:, :, None]) + l2 * decay * look
        new = look - lr * grad
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        look, weights, t = new + (t - 1.0) / t_next * (new - weights), new, t_next
    query = torch.cat([data.x_test[test_index].double(), torch.ones(1, dtype=torch.float64)])
    z = torch.einsum("d,bdc->bc", query, weights)
    y = int(data.y_test[test_index])
    others = z.masked_fill(torch.arange(classes) == y, float("-inf"))
    return z[:, y] - torch.logsumexp(others, dim=1)


def digits_retrain(
    data: SupervisedData, test_index: int = 0, *, l2: float = 1e-2, steps: int = 300
) -> Retrain:
    """``retrain(mask) -> float``: :func:`digits_margins` of one subset."""
    n = int(data.x_train.shape[0])

    def retrain(mask: Tensor) -> float:
        keep = _check_mask(mask, n)
        return float(digits_margins(data, keep[None], test_index, l2=l2, steps=steps)[0])

    return retrain


def ppo_round_retrain(ctx: RoundContext, seed: int = 0) -> Retrain:
    """``retrain(mask) -> float``: ``ctx.target`` after the round re-run from theta(k) on the kept
    records with minibatch seed ``seed`` (theta(k) itself for an empty subset)."""
    n = len(ctx.snapshot.records)

    def retrain(mask: Tensor) -> float:
        keep = _check_mask(mask, n)
        if not bool(keep.any()):
            return float(ctx.target_value(ctx.snapshot.theta)[0])
        theta = retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, keep, seed)
        return float(ctx.target_value(theta)[0])

    return retrain


def calibrated_claim(scores: Tensor, masks: Tensor, values: Tensor) -> Claim:
    """``Claim(b, a * scores)`` with ``(a, b)`` the least-squares fit of ``values: Tensor[M]`` on
    ``masks @ scores`` (``scores: Tensor[n]``, ``masks: Tensor[M, n]`` bool, the Prover's own
    retrainings, drawn before and apart from the Verifier's queries)."""
    scores = torch.as_tensor(scores).double()
    if masks.dim() != 2 or masks.shape[1] != scores.numel() or values.shape != (masks.shape[0],):
        raise RlattrError(
            f"scores, masks, values: expected [n], [M, n], [M]; got {tuple(scores.shape)}, "
            f"{tuple(masks.shape)}, {tuple(values.shape)}"
        )
    if masks.shape[0] < 2:
        raise RlattrError(
            f"masks: expected at least 2 retrainings to fit scale and intercept, got {masks.shape[0]}"
        )
    pred = masks.double() @ scores
    design = torch.stack([pred, torch.ones_like(pred)], dim=1)
    coef = torch.linalg.lstsq(design, values.double()[:, None]).solution[:, 0]
    return Claim(float(coef[1]), scores * coef[0])


__all__ = ["calibrated_claim", "digits_margins", "digits_retrain", "ppo_round_retrain"]
