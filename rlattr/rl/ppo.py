"""The per-record PPO loss, written exactly as stable-baselines3's ``PPO.train`` optimises it.

SB3 minimises, per minibatch M of size B::

    L(M) = -mean_i min(A~_i r_i, A~_i clip(r_i, 1-c, 1+c)) + ent_coef * (-mean_i H_i)
           + vf_coef * mean_i (R_i - V_i)^2,        r_i = exp(log pi(a_i|s_i) - log pi_old_i)

with ``A~ = (A - mean_M A) / (std_M A + 1e-8)`` (unbiased std, skipped for B = 1 or when
``normalize_advantage=False``). The per-record loss of record i is the summand of record i
(without the 1/B, a constant that scales all scores alike); the value term is included only when
the value parameters are tracked (``include_value_loss``), as the actor-only score of the paper
leaves it out. With no analytic entropy SB3 uses ``-log pi``; so does :func:`ppo_record_loss`.

Not mirrored, on purpose: ``max_grad_norm`` clipping acts on a minibatch's summed gradient, not on
a record's, and the 1/B of the mean is a constant; neither changes the ranking of records.

Which advantage normalisation the score uses (``advantage_norm``):

* ``"buffer"`` (default when SB3 normalises): A~ with the mean and std of the whole round's
  buffer. SB3's minibatch statistics change with every epoch's random permutation, so record i
  meets ``n_epochs`` different (mean, std) pairs; each is an estimate of the buffer's, and the
  buffer statistics are the permutation-free value they all estimate. The score then does not
  depend on a random draw the update has not made yet, and it equals the paper's single-checkpoint
  form up to the minibatch noise.
* ``"minibatch"``: the statistics of the minibatch record i falls in during the update's *first*
  epoch (the SB3 adapter reproduces that permutation without consuming the RNG). Exact for the
  first epoch's gradient at theta(k).
* ``"none"``: raw advantages (what SB3 uses when ``normalize_advantage=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlattr.core.task import Batch, LossFn, Params
from rlattr.errors import RlattrError

ADVANTAGE_NORMS = ("buffer", "minibatch", "none")
SB3_ADV_EPS = 1e-8


class PolicyOutput(NamedTuple):
    """What a policy says about given (state, action) pairs.

    Attributes:
        log_prob: ``Tensor[n]``, log pi(a|s).
        entropy: ``Tensor[n]`` or ``None`` when the distribution has no analytic entropy.
        values: ``Tensor[n]`` or ``None``, V(s) (needed only for the value term).
    """

    log_prob: Tensor
    entropy: Tensor | None
    values: Tensor | None


PolicyEval = Callable[[Params, Any, Tensor], PolicyOutput]
"""``(params, observations, actions: Tensor[n, ...]) -> PolicyOutput``; observations are
``Tensor[n, ...]`` or, for dict observation spaces, ``{key: Tensor[n, ...]}``."""


@dataclass
class PPOLossConfig:
    """The PPO hyperparameters the per-record loss needs.

    Args:
        clip_range: epsilon of the clipped surrogate (SB3's current ``clip_range`` value).
        ent_coef: entropy coefficient; the entropy term is included when it is non-zero.
        vf_coef: value-loss coefficient (used only when ``include_value_loss``).
        advantage_norm: ``"buffer"``, ``"minibatch"`` or ``"none"`` (see the module docstring).
        include_value_loss: add ``vf_coef * (R_i - V_i)^2`` (when the value head is tracked).
    """

    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    advantage_norm: str = "buffer"
    include_value_loss: bool = False

    def __post_init__(self) -> None:
        if self.advantage_norm not in ADVANTAGE_NORMS:
            raise RlattrError(f"advantage_norm: got {self.advantage_norm!r}; supported: {ADVANTAGE_NORMS}")
        if not self.clip_range > 0:
            raise RlattrError(f"clip_range: must be > 0, got {self.clip_range!r}")
        for name in ("ent_coef", "vf_coef"):
            if not isinstance(getattr(self, name), (int, float)):
                raise TypeError(f"{name}: expected a number, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _standardise(adv: Tensor) -> Tensor:
    if adv.numel() <= 1:
        return adv
    return (adv - adv.mean()) / (adv.std() + SB3_ADV_EPS)


def normalise_advantages(advantages: Tensor, mode: str, minibatch_of: Tensor | None = None) -> Tensor:
    """The advantages the per-record loss uses: ``Tensor[n]``.

    Args:
        advantages: raw GAE advantages ``Tensor[n]``.
        mode: ``"buffer"``, ``"minibatch"`` or ``"none"``.
        minibatch_of: ``Tensor[n]`` int, the minibatch label of every record (``"minibatch"`` only).
    """
    if mode not in ADVANTAGE_NORMS:
        raise RlattrError(f"mode: got {mode!r}; supported: {ADVANTAGE_NORMS}")
    if mode == "none":
        return advantages.clone()
    if mode == "buffer":
        return _standardise(advantages)
    if minibatch_of is None or minibatch_of.shape != advantages.shape:
        got = None if minibatch_of is None else tuple(minibatch_of.shape)
        raise RlattrError(
            f"minibatch_of: mode 'minibatch' needs Tensor[{advantages.shape[0]}] labels, got {got}"
        )
    out = torch.empty_like(advantages)
    for label in torch.unique(minibatch_of):
        mask = minibatch_of == label
        out[mask] = _standardise(advantages[mask])
    return out


def ppo_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Per-record clipped surrogate ``-min(A r, A clip(r, 1-c, 1+c))``: ``Tensor[n]``."""
    ratio = torch.exp(log_prob - old_log_prob)
    surr1 = advantages * ratio
    surr2 = advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return -torch.min(surr1, surr2)


def ppo_record_loss(policy_eval: PolicyEval, config: PPOLossConfig) -> LossFn:
    """The per-record PPO loss as a core ``LossFn``: ``(params, batch) -> Tensor[n]``.

    ``batch`` is a dict with ``observations``, ``actions``, ``old_log_prob``, ``norm_advantages``
    (from :func:`normalise_advantages`) and, for the value term, ``returns``.
    """

    def loss(params: Params, batch: Batch) -> Tensor:
        out = policy_eval(params, batch["observations"], batch["actions"])
        dtype, device = out.log_prob.dtype, out.log_prob.device
        adv = batch["norm_advantages"].to(dtype=dtype, device=device)
        old = batch["old_log_prob"].to(dtype=dtype, device=device)
        total = ppo_policy_loss(out.log_prob, old, adv, config.clip_range)
        if config.ent_coef != 0.0:
            entropy = out.entropy if out.entropy is not None else -out.log_prob
            total = total - config.ent_coef * entropy
        if config.include_value_loss:
            if out.values is None:
                raise RlattrError(
                    "policy_eval: include_value_loss needs values, but the evaluator returned None"
                )
            returns = batch["returns"].to(dtype=out.values.dtype, device=out.values.device)
            total = total + config.vf_coef * (returns - out.values.reshape(-1)) ** 2
        return total

    return loss


__all__ = [
    "ADVANTAGE_NORMS",
    "PPOLossConfig",
    "PolicyEval",
    "PolicyOutput",
    "normalise_advantages",
    "ppo_policy_loss",
    "ppo_record_loss",
]
