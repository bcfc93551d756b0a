"""Provers of the verification protocol: the honest one and the manipulations the paper warns about.

:class:`HonestProver` claims a fitted datamodel (:func:`fit_datamodel`, least squares on its own
retrainings) and answers the Verifier's queries by retraining. The dishonest claims
(:data:`DISHONEST`) keep honest answers but distort the scores: all scaled down, a favoured subset
boosted, permuted, random. :class:`FabricatingProver` answers from its own claim instead of
retraining, which only the spot checks can catch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlattr.errors import RlattrError
from rlattr.eval.verify.protocol import Claim, Retrain


@dataclass
class HonestProver:
    """Answers every query by retraining (``retrain(mask) -> float``) and claims ``datamodel``."""

    datamodel: Claim
    retrain: Retrain
    name: str = "honest"

    def claim(self) -> Claim:
        return self.datamodel

    def answer(self, masks: Tensor) -> Tensor:
        return torch.tensor([float(self.retrain(row)) for row in masks], dtype=torch.float64)


@dataclass
class FabricatingProver:
    """Claims ``datamodel`` and answers with its own predictions instead of retraining: the
    residuals are then zero, so only the spot checks can catch it."""

    datamodel: Claim
    name: str = "fabricated_answers"

    def claim(self) -> Claim:
        return self.datamodel

    def answer(self, masks: Tensor) -> Tensor:
        return self.datamodel.predict(masks)


def fit_datamodel(masks: Tensor, values: Tensor, ridge: float = 1e-6) -> Claim:
    """Least-squares linear datamodel of ``values: Tensor[M]`` on ``masks: Tensor[M, n]`` bool
    (ridge ``ridge * M`` on the scores, not on the intercept): what an honest Prover claims."""
    if masks.dim() != 2 or masks.dtype != torch.bool or values.shape != (masks.shape[0],):
        raise RlattrError(
            f"masks, values: expected bool [M, n] and [M], got {masks.dtype} {tuple(masks.shape)}, "
            f"{tuple(values.shape)}"
        )
    m, n = masks.shape
    mean = masks.double().mean(0)
    x = masks.double() - mean  # centred columns keep the intercept out of the ridge
    y = values.double()
    gram = x.T @ x + ridge * m * torch.eye(n, dtype=torch.float64)
    scores = torch.linalg.solve(gram, x.T @ (y - y.mean()))
    return Claim(float(y.mean() - mean @ scores), scores)


def scaled_down(claim: Claim, factor: float = 0.5) -> Claim:
    """Every score times ``factor`` (e.g. to pay data contributors less); intercept kept."""
    return Claim(claim.intercept, claim.scores * factor)


def boost_favoured(claim: Claim, fraction: float = 0.1, amount: float = 2.0, seed: int = 0) -> Claim:
    """A random ``fraction`` of the records gets ``amount`` x std(scores) added to its score."""
    gen = torch.Generator().manual_seed(seed)
    favoured = torch.randperm(claim.n, generator=gen)[: max(1, round(fraction * claim.n))]
    scores = claim.scores.clone()
    scores[favoured] += amount * float(claim.scores.std().clamp_min(1e-12))
    return Claim(claim.intercept, scores)


def permuted(claim: Claim, seed: int = 0) -> Claim:
    """The same scores attached to the wrong records."""
    gen = torch.Generator().manual_seed(seed)
    return Claim(claim.intercept, claim.scores[torch.randperm(claim.n, generator=gen)])


def random_scores(claim: Claim, seed: int = 0) -> Claim:
    """Gaussian scores with the claim's mean and std (no information about the records)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(claim.n, generator=gen, dtype=torch.float64)
    return Claim(claim.intercept, claim.scores.mean() + claim.scores.std() * noise)


DISHONEST: dict[str, Callable[[Claim, int], Claim]] = {
    "scaled_down": lambda c, s: scaled_down(c),
    "boost_favoured": lambda c, s: boost_favoured(c, seed=s),
    "permuted": lambda c, s: permuted(c, seed=s),
    "random": lambda c, s: random_scores(c, seed=s),
}


__all__ = [
    "DISHONEST",
    "FabricatingProver",
    "HonestProver",
    "boost_favoured",
    "fit_datamodel",
    "permuted",
    "random_scores",
    "scaled_down",
]
