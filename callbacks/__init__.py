"""Framework adapters, installed as ``rlattr.callbacks``: stable-baselines3 and TRL.

Importing this package imports neither SB3 nor TRL; ``from rlattr.callbacks import X`` loads the
adapter module that defines X on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InfluenceCallback": "rlattr.callbacks.sb3",
    "IIFCallback": "rlattr.callbacks.sb3_iif",
    "RoundRecorder": "rlattr.callbacks.sb3_replay",
    "IIFGRPOTrainer": "rlattr.callbacks.trl",
    "IIFRLOOTrainer": "rlattr.callbacks.trl",
    "AttributionConfig": "rlattr.callbacks.trl",
    "AttributionLogger": "rlattr.callbacks.trl",
    "with_attribution": "rlattr.callbacks.trl",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlattr.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
