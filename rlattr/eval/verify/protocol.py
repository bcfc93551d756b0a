"""Verifiable attribution: a Prover / Verifier protocol for linear datamodels.

After Karchmer, Pawelczyk and Neel, "Efficiently Verifiable Proofs of Data Attribution" (NeurIPS
2025, arXiv 2508.10866). A *claim* is a linear datamodel over the Boolean hypercube,
``h(S) = b + sum_{i in S} tau_i`` for a subset S of the n training records (a bool mask), of a
scalar target ``f(S)`` = the target after retraining on S. Subsets are uniform over ``{0,1}^n``
(every record kept independently with probability 1/2). The best linear datamodel h* minimises
``E_S[(f(S) - h(S))^2]``; in the +-1 coding ``z = 2x - 1`` its coefficients are the degree <= 1
Fourier coefficients of f, and the *excess* MSE of a claim is ``E[(f - h)^2] - E[(f - h*)^2] =
sum_{|T| <= 1} r_hat(T)^2``, the degree <= 1 Fourier weight of the residual ``r = f - h``.

The protocol (:class:`Verifier`):

1. The Verifier draws m uniform subsets from a secret seed and asks the Prover for ``f`` on each
   (the Prover retrains m times; m grows like sqrt(n) / epsilon, see :func:`default_queries`).
2. It secretly picks ``k = ceil(ln(2 / delta) / epsilon)`` of the m answers and retrains on those
   subsets itself (the spot checks): any answer off by more than ``tolerance`` rejects. This is
   the Verifier's only retraining, and k does not depend on n.
3. From the m answers it estimates the excess MSE of the claim without bias by the U-statistic
   ``U = (||Z^T r||^2 - (n + 1) ||r||^2) / (m (m - 1))`` (``Z = [1, z]: [m, n + 1]``, r the
   residuals of the claim), the best achievable MSE by the Fourier residual ``mean(r^2) - U``, and
   accepts iff ``U <= epsilon * Var(f)`` (epsilon is relative to the target's variance over
   subsets, so one epsilon fits targets of any scale).

Guarantees (also written into every :class:`Transcript`): spot checks: if a fraction >= epsilon
of the answers is wrong, the Verifier rejects with probability >= 1 - delta / 2. Statistic: U is
unbiased for the excess when the answers are right; with the half-width w of a one-sided normal
interval at level delta / 2 (:func:`excess_statistics`), an accepted claim has excess <=
epsilon Var(f) + w, and a claim with excess <= epsilon Var(f) - w is accepted, each with
probability >= 1 - delta / 2. The normal approximation of U and the plug-in of its variance are
the simplifications; a finite-sample bound for a bounded target would ask for more queries.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from rlattr.core.store import load_json, save_json
from rlattr.errors import RlattrError, StoreError

TRANSCRIPT_KIND = "rlattr.verify.transcript"
TRANSCRIPT_VERSION = 1
Retrain = Callable[[Tensor], float]


@dataclass(frozen=True)
class Claim:
    """A linear datamodel ``h(S) = intercept + sum_{i in S} scores_i`` (``scores: Tensor[n]``)."""

    intercept: float
    scores: Tensor

    def __post_init__(self) -> None:
        s = torch.as_tensor(self.scores)
        if s.dim() != 1 or s.numel() < 1 or not bool(torch.isfinite(s).all()):
            raise RlattrError(f"scores: expected a finite Tensor[n] with n >= 1, got shape {tuple(s.shape)}")
        if not math.isfinite(float(self.intercept)):
            raise RlattrError(f"intercept: expected a finite number, got {self.intercept!r}")
        object.__setattr__(self, "scores", s.detach().double().cpu())
        object.__setattr__(self, "intercept", float(self.intercept))

    @property
    def n(self) -> int:
        return int(self.scores.numel())

    def predict(self, masks: Tensor) -> Tensor:
        """``Tensor[m]``: h of each row of ``masks: Tensor[m, n]`` bool."""
        return masks.double() @ self.scores + self.intercept


class Prover(Protocol):
    """The Prover's side: a claim, and the target after retraining on each asked subset."""

    name: str

    def claim(self) -> Claim: ...

    def answer(self, masks: Tensor) -> Tensor:
        """``Tensor[m]``: f of each row of ``masks: Tensor[m, n]`` bool."""
        ...


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise RlattrError(f"{name}: got {value!r}; supported: a number in (0, 1)")
    return float(value)


def spot_checks_needed(epsilon: float, delta: float) -> int:
    """``ceil(ln(2 / delta) / epsilon)``: the Verifier's retrainings (catch a >= epsilon fraction of
    wrong answers with probability >= 1 - delta / 2). Independent of n."""
    eps, dlt = _check_probability("epsilon", epsilon), _check_probability("delta", delta)
    return math.ceil(math.log(2.0 / dlt) / eps)


def default_queries(n: int, epsilon: float, delta: float) -> int:
    """Queries the Prover answers: ``ceil(4 sqrt(n + 1) / epsilon)`` (the U-statistic's standard
    deviation is about ``sqrt(2 (n + 1)) s^2 / m`` for residual variance s^2), at least the spot checks."""
    return max(math.ceil(4.0 * math.sqrt(n + 1) / _check_probability("epsilon", epsilon)),
               spot_checks_needed(epsilon, delta))  # fmt: skip


def excess_statistics(masks: Tensor, answers: Tensor, claim: Claim, delta: float) -> dict[str, float]:
    """Estimates from the answered queries (``masks: Tensor[m, n]`` bool, ``answers: Tensor[m]``):
    ``excess`` (the U-statistic, unbiased for the excess MSE of ``claim``), ``half_width`` (one-sided
    normal bound at level delta / 2), ``claim_mse`` (mean squared residual, the naive check),
    ``best_mse`` (Fourier residual: claim_mse - excess) and ``variance`` (of the answers)."""
    m, n = masks.shape
    if m < 3:
        raise RlattrError(f"masks: expected at least 3 answered queries, got {m}")
    r = answers.double() - claim.predict(masks)
    z = torch.cat([torch.ones(m, 1, dtype=torch.float64), 2.0 * masks.double() - 1.0], dim=1)
    proj = z.T @ r  # [n + 1]: sum_j r_j chi_T(z_j) for every |T| <= 1
    sq = float(r.pow(2).sum())
    excess = (float(proj.pow(2).sum()) - (n + 1) * sq) / (m * (m - 1))
    # Hoeffding decomposition of the U-statistic's variance: zeta_1 from the leave-one-out
    # projections g_j, zeta_2 ~ E[r^2]^2 E[K^2] with E[K^2] = n + 1 for independent subsets
    g = r * (z @ proj - (n + 1) * r) / (m - 1)
    zeta1 = float(g.var()) if m > 1 else 0.0
    s2 = sq / m
    var_u = 4.0 * (m - 2) / (m * (m - 1)) * zeta1 + 2.0 * (n + 1) * s2 * s2 / (m * (m - 1))
    z_level = statistics.NormalDist().inv_cdf(1.0 - delta / 2.0)
    return {
        "excess": excess,
        "half_width": z_level * math.sqrt(max(var_u, 0.0)),
        "claim_mse": s2,
        "best_mse": s2 - excess,
        "variance": float(answers.double().var()),
    }


def pack_masks(masks: Tensor) -> list[str]:
    """Each row of ``masks: Tensor[m, n]`` bool as a hex string (bits packed big-endian)."""
    return [bytes(np.packbits(row)).hex() for row in masks.numpy().astype(np.uint8)]


def unpack_masks(rows: list[str], n: int) -> Tensor:
    """Inverse of :func:`pack_masks`: ``Tensor[m, n]`` bool."""
    try:
        bits = [np.unpackbits(np.frombuffer(bytes.fromhex(r), dtype=np.uint8))[:n] for r in rows]
    except (ValueError, TypeError) as err:
        raise StoreError(f"queries: not hex-packed masks ({err})") from err
    if any(b.shape != (n,) for b in bits):
        raise StoreError(f"queries: a packed mask holds fewer than n = {n} bits")
    return torch.from_numpy(np.stack(bits).astype(bool)) if bits else torch.zeros(0, n, dtype=torch.bool)


def guarantee_text(epsilon: float, delta: float, k: int, half_width: float) -> str:
    """The guarantee a transcript carries, in words."""
    return (
        f"spot checks ({k} retrainings): a Prover whose answers are wrong on >= {epsilon:g} of the queries "
        f"is rejected with probability >= {1 - delta / 2:g}; statistic: with probability >= "
        f"{1 - delta / 2:g} (normal approximation), an accepted claim has excess MSE <= epsilon Var(f) "
        f"+ {half_width:.3g}, and a claim with excess MSE <= epsilon Var(f) - {half_width:.3g} is accepted"
    )


@dataclass
class Transcript:
    """One run of the protocol: what was asked, what was answered, the decision and its guarantee.

    ``queries`` are the asked subsets as hex-packed masks (:func:`pack_masks`), ``answers`` the
    Prover's ``f`` on each, ``claim_*`` its datamodel, ``spot_checked`` the positions the Verifier
    retrained and ``spot_values`` what it measured, ``n_retrainings`` how many retrainings the
    Verifier ran, ``statistics`` the output of :func:`excess_statistics` plus the threshold.
    ``seed`` is the Verifier's secret, revealed once the protocol is over (for audit).
    """

    n: int
    epsilon: float
    delta: float
    tolerance: float
    seed: int
    queries: list[str]
    answers: list[float]
    claim_intercept: float
    claim_scores: list[float]
    spot_checked: list[int]
    spot_values: list[float]
    n_retrainings: int
    statistics: dict[str, float]
    decision: str
    reason: str
    guarantee: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision == "accept"

    def masks(self) -> Tensor:
        """The asked subsets: ``Tensor[m, n]`` bool."""
        return unpack_masks(self.queries, self.n)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {"kind": TRANSCRIPT_KIND, "format_version": TRANSCRIPT_VERSION, **out}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the transcript as JSON, atomically (:func:`rlattr.core.store.save_json`)."""
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Transcript:
        """Read a transcript back; a file of another kind or a newer version is a :class:`StoreError`."""
        doc = load_json(path)
        if not isinstance(doc, dict) or doc.get("kind") != TRANSCRIPT_KIND:
            raise StoreError(f"path: {str(path)!r} is not an rlattr verification transcript")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > TRANSCRIPT_VERSION:
            raise StoreError(
                f"format_version: got {version!r}; supported: up to {TRANSCRIPT_VERSION} (upgrade rlattr)"
            )
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - {"meta"} - set(doc))
        if missing:
            raise StoreError(f"path: {str(path)!r} lacks the fields {missing}")
        _check_fields(doc, str(path))
        out = cls(**{k: doc[k] for k in names if k in doc})
        out.masks()  # validates the packed queries against n
        return out


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_fields(doc: dict[str, Any], path: str) -> None:
    """A received transcript is untrusted: type-check what :meth:`Transcript.masks` and readers use."""
    checks = {
        "n": isinstance(doc["n"], int) and not isinstance(doc["n"], bool) and doc["n"] >= 1,
        "queries": isinstance(doc["queries"], list) and all(isinstance(q, str) for q in doc["queries"]),
        "answers": isinstance(doc["answers"], list) and all(map(_is_number, doc["answers"])),
        "claim_scores": isinstance(doc["claim_scores"], list) and all(map(_is_number, doc["claim_scores"])),
        "spot_checked": isinstance(doc["spot_checked"], list)
        and all(isinstance(j, int) for j in doc["spot_checked"]),
        "statistics": isinstance(doc["statistics"], dict),
        "decision": doc["decision"] in ("accept", "reject"),
        "meta": isinstance(doc.get("meta", {}), dict),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise StoreError(f"path: {path!r} has malformed fields {bad}")


class Verifier:
    """The Verifier of the protocol (module docstring): spot checks plus the excess-MSE statistic.

    Args:
        retrain: ``retrain(mask: bool Tensor[n]) -> float``, the target after retraining on the
            records where ``mask`` is set.
        epsilon: tolerated excess MSE, as a fraction of the target's variance over subsets, and the
            fraction of wrong answers the spot checks catch; in (0, 1).
        delta: failure probability, in (0, 1).
        queries: how many subsets the Prover answers (default :func:`default_queries`).
        tolerance: an answer may differ from the Verifier's retraining by ``tolerance * max(1, |f|)``.
        seed: the secret seed of the queries and spot checks (default: drawn from the OS).
    """

    def __init__(
        self,
        retrain: Retrain,
        epsilon: float,
        delta: float,
        *,
        queries: int | None = None,
        tolerance: float = 1e-6,
        seed: int | None = None,
    ) -> None:
        if not callable(retrain):
            raise RlattrError(f"retrain: got {type(retrain).__name__}; supported: a callable mask -> float")
        self.retrain = retrain
        self.k = spot_checks_needed(epsilon, delta)
        self.epsilon, self.delta = float(epsilon), float(delta)
        if queries is not None and (
            isinstance(queries, bool) or not isinstance(queries, int) or queries < max(3, self.k)
        ):
            raise RlattrError(f"queries: got {queries!r}; supported: an integer >= {max(3, self.k)}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
            raise RlattrError(f"tolerance: got {tolerance!r}; supported: a number >= 0")
        self.queries, self.tolerance = queries, float(tolerance)
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else int(seed)

    def draw_queries(self, n: int, gen: torch.Generator) -> Tensor:
        """``Tensor[m, n]`` bool: uniform subsets of {0,1}^n (each record kept with probability 1/2)."""
        m = self.queries if self.queries is not None else default_queries(n, self.epsilon, self.delta)
        return torch.rand(m, n, generator=gen, dtype=torch.float64) < 0.5

    def run(self, prover: Prover, *, masks: Tensor | None = None) -> Transcript:
        """Run the protocol against ``prover``. ``masks`` (``Tensor[m, n]`` bool) replaces the secret
        draw, for simulations whose retraining outcomes were computed beforehand on uniform subsets."""
        claim = prover.claim()
        if not isinstance(claim, Claim):
            raise RlattrError(f"prover.claim(): got {type(claim).__name__}; supported: a Claim")
        gen = torch.Generator().manual_seed(self.seed)
        masks = self.draw_queries(claim.n, gen) if masks is None else self._check_masks(masks, claim.n)
        start = time.perf_counter()
        answers = torch.as_tensor(prover.answer(masks), dtype=torch.float64).reshape(-1)
        prover_seconds = time.perf_counter() - start
        start = time.perf_counter()
        checked, values, reason = self._spot_check(masks, answers, gen)
        stats: dict[str, float] = {}
        if not reason:
            stats = excess_statistics(masks, answers, claim, self.delta)
            stats["threshold"] = self.epsilon * stats["variance"]
            if stats["excess"] > stats["threshold"]:
                reason = f"excess MSE {stats['excess']:.4g} > epsilon Var(f) = {stats['threshold']:.4g}"
        meta = {"prover": getattr(prover, "name", type(prover).__name__), "prover_seconds": prover_seconds,
                "verifier_seconds": time.perf_counter() - start}  # fmt: skip
        return Transcript(
            n=claim.n, epsilon=self.epsilon, delta=self.delta, tolerance=self.tolerance, seed=self.seed,
            queries=pack_masks(masks), answers=answers.tolist() if answers.shape == (len(masks),) else [],
            claim_intercept=claim.intercept, claim_scores=claim.scores.tolist(), spot_checked=checked,
            spot_values=values, n_retrainings=len(values), statistics=stats,
            decision="reject" if reason else "accept", reason=reason or "spot checks passed; excess within epsilon",
            guarantee=guarantee_text(self.epsilon, self.delta, self.k, stats.get("half_width", float("nan"))),
            meta=meta,
        )  # fmt: skip

    @staticmethod
    def _check_masks(masks: Tensor, n: int) -> Tensor:
        if masks.dim() != 2 or masks.dtype != torch.bool or masks.shape[1] != n or masks.shape[0] < 3:
            raise RlattrError(
                f"masks: got {masks.dtype} {tuple(masks.shape)}; supported: a bool Tensor[m, {n}], m >= 3"
            )
        return masks

    def _spot_check(
        self, masks: Tensor, answers: Tensor, gen: torch.Generator
    ) -> tuple[list[int], list[float], str]:
        """Retrain on k secretly chosen queries; stop at the first wrong answer."""
        m = masks.shape[0]
        if answers.shape != (m,) or not bool(torch.isfinite(answers).all()):
            return [], [], f"malformed answers: expected {m} finite numbers, got shape {tuple(answers.shape)}"
        order = torch.randperm(m, generator=gen)[: min(self.k, m)].tolist()
        checked: list[int] = []
        values: list[float] = []
        for j in order:
            value = float(self.retrain(masks[j].clone()))
            checked.append(int(j))
            values.append(value)
            if abs(float(answers[j]) - value) > self.tolerance * max(1.0, abs(value)):
                return (
                    checked,
                    values,
                    f"spot check {j}: answered {float(answers[j]):.6g}, retraining gives {value:.6g}",
                )
        return checked, values, ""


__all__ = [
    "Claim",
    "Prover",
    "Retrain",
    "Transcript",
    "Verifier",
    "default_queries",
    "excess_statistics",
    "guarantee_text",
    "pack_masks",
    "spot_checks_needed",
    "unpack_masks",
]
