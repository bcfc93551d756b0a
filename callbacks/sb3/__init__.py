"""stable-baselines3 adapter: callbacks on vanilla SB3 PPO, exact round replay, the YAML runner.

Modules: ``influence`` (InfluenceCallback), ``iif`` (IIFCallback and buffer compaction), ``policy``
(SB3 policy -> rl evaluator), ``replay`` (RoundRecorder), ``validation`` (held-out rollouts),
``config`` + ``train`` (``rlattr train``).
"""

from rlattr.callbacks.sb3.iif import IIFCallback
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.callbacks.sb3.replay import RoundRecorder

__all__ = ["IIFCallback", "InfluenceCallback", "RoundRecorder"]
