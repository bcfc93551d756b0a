"""Checks InfluenceCallback runs every round: a buffer nobody reshaped, finite rewards, something to score.

Each names the cause and what to do, instead of letting a deep ``FloatingPointError`` or a
"selector matches no parameter" surface rounds later.
"""

from __future__ import annotations

import torch
from stable_baselines3 import PPO

from rlattr.errors import RlattrError
from rlattr.rl.records import RecordBatch


def check_buffer_shape(model: PPO, k: int) -> None:
    """Refuse a rollout buffer another callback has already reshaped (IIF compacts it in place)."""
    buf = model.rollout_buffer
    if (buf.buffer_size, buf.n_envs) != (model.n_steps, model.n_envs):
        raise RlattrError(
            f"rollout_buffer: shape ({buf.buffer_size}, {buf.n_envs}) in round {k}, expected "
            f"({model.n_steps}, {model.n_envs}): another callback (IIFCallback?) compacted it before "
            "this one ran; put InfluenceCallback first in the CallbackList, or use IIFCallback alone "
            "(it scores every record itself)"
        )


def check_finite(records: RecordBatch) -> None:
    """Name non-finite rewards (or advantages, values, returns) of a round before they reach the gradients."""
    k = records.round_index
    n_bad = int((~torch.isfinite(records.rewards)).sum())
    if n_bad:
        raise RlattrError(
            f"rewards: round {k} holds {n_bad} non-finite reward(s) (NaN or inf) from the environment, so "
            "its advantages are not finite either; fix or clip the rewards (e.g. a gymnasium wrapper)"
        )
    for name in ("advantages", "values", "returns"):
        n_bad = int((~torch.isfinite(getattr(records, name))).sum())
        if n_bad:
            raise RlattrError(
                f"{name}: round {k} holds {n_bad} non-finite {name} (NaN or inf) although the rewards are "
                "finite: the value network diverged (lower the learning rate or clip gradients)"
            )


def check_trainable(param_names: list[str], which: str) -> None:
    """Refuse an empty set of tracked parameters (all frozen): there is no gradient to score."""
    if not param_names:
        raise RlattrError(
            f"params: no trainable {which} parameter (every one has requires_grad=False), so there is "
            "no gradient to score; unfreeze some (or pass params='all')"
        )


__all__ = ["check_buffer_shape", "check_finite", "check_trainable"]
