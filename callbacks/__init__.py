"""Framework adapters, installed as ``rlattr.callbacks``: stable-baselines3 and TRL.

Importing this package imports neither SB3 nor TRL; ``from rlattr.callbacks import X`` loads the
adapter module that defines X on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InfluenceCallback": "rlattr.callbacks.sb3.influence",
    "IIFCallback": "rlattr.callbacks.sb3.iif",
    "RoundRecorder": "rlattr.callbacks.sb3.replay",
    "IIFGRPOTrainer": "rlattr.callbacks.trl.trainer",
    "IIFRLOOTrainer": "rlattr.callbacks.trl.trainer",
    "AttributionConfig": "rlattr.callbacks.trl.config",
    "IIFGRPOConfig": "rlattr.callbacks.trl.config",
    "IIFRLOOConfig": "rlattr.callbacks.trl.config",
    "AttributionLogger": "rlattr.callbacks.trl.logs",
    "with_attribution": "rlattr.callbacks.trl.trainer",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlattr.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
