"""TRL adapter: GRPO / RLOO trainers that score (and optionally drop) prompt-completion pairs.

Modules: ``trainer`` (the mixin, IIFGRPOTrainer, IIFRLOOTrainer), ``config`` (IIFGRPOConfig,
IIFRLOOConfig, AttributionConfig), ``batch`` (row surgery on TRL's generation batch), ``logs``
(AttributionLogger: TRL's metrics, completion tables, the run folder).
"""

from rlattr.callbacks.trl.config import AttributionConfig, IIFGRPOConfig, IIFRLOOConfig
from rlattr.callbacks.trl.logs import AttributionLogger
from rlattr.callbacks.trl.trainer import (
    AttributionMixin,
    IIFGRPOTrainer,
    IIFRLOOTrainer,
    with_attribution,
)

__all__ = [
    "AttributionConfig",
    "AttributionLogger",
    "AttributionMixin",
    "IIFGRPOConfig",
    "IIFGRPOTrainer",
    "IIFRLOOConfig",
    "IIFRLOOTrainer",
    "with_attribution",
]
