"""Attribution methods, one module per family, all with the cache / attribute split."""

from rlattr.core.methods.base import Attributor, query_grads
from rlattr.core.methods.distill import DistilledEmbedding, recall_at_k
from rlattr.core.methods.influence import InfluenceFunction, self_influence
from rlattr.core.methods.representation import AirRep
from rlattr.core.methods.rif import NewtonStep, RescaledInfluence
from rlattr.core.methods.similarity import GradCos, GradDot
from rlattr.core.methods.solvers import STRATEGIES, Solver
from rlattr.core.methods.tracin import TracIn
from rlattr.core.methods.trak import TRAK
from rlattr.core.methods.unlearning import Unlearning
from rlattr.core.methods.weighting import LearnedWeights

__all__ = [
    "STRATEGIES",
    "AirRep",
    "Attributor",
    "DistilledEmbedding",
    "GradCos",
    "GradDot",
    "InfluenceFunction",
    "LearnedWeights",
    "NewtonStep",
    "RescaledInfluence",
    "Solver",
    "TRAK",
    "TracIn",
    "Unlearning",
    "query_grads",
    "recall_at_k",
    "self_influence",
]
