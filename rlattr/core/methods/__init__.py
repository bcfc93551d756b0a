"""Attribution methods, one module per family, all with the cache / attribute split."""

from rlattr.core.methods.base import Attributor, query_grads
from rlattr.core.methods.similarity import GradCos, GradDot

__all__ = ["Attributor", "GradCos", "GradDot", "query_grads"]
