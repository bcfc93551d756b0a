"""rlattr: training-data attribution for online reinforcement learning and supervised models."""

__version__ = "0.1.0"

from rlattr.core import Task  # noqa: E402
from rlattr.rl.snapshots import load_run  # noqa: E402

__all__ = ["Task", "__version__", "load_run"]
