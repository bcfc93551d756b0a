"""TRL adapter: GRPO / RLOO trainers that score (and optionally drop) prompt-completion pairs.

Modules: ``trainer`` (AttributionConfig, the mixin, IIFGRPOTrainer, IIFRLOOTrainer), ``batch``
(row surgery on TRL's generation batch), ``logs`` (AttributionLogger).
"""

from rlattr.callbacks.trl.logs import AttributionLogger
from rlattr.callbacks.trl.trainer import (
    AttributionConfig,
    AttributionMixin,
    IIFGRPOTrainer,
    IIFRLOOTrainer,
    with_attribution,
)

__all__ = [
    "AttributionConfig",
    "AttributionLogger",
    "AttributionMixin",
    "IIFGRPOTrainer",
    "IIFRLOOTrainer",
    "with_attribution",
]
