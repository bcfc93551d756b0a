"""Verifiable attribution (Karchmer, Pawelczyk, Neel, NeurIPS 2025): a Verifier that checks a
claimed linear datamodel with a number of retrainings independent of the data-set size.

* :mod:`~rlattr.eval.verify.protocol`: :class:`Claim`, the :class:`Verifier`, the
  :class:`Transcript` (JSON, versioned) and the excess-MSE estimator.
* :mod:`~rlattr.eval.verify.provers`: the honest Prover and the dishonest ones.
* :mod:`~rlattr.eval.verify.tasks`: retraining functions for digits logistic regression and for
  one PPO round (exact replay from theta(k)).
"""

from rlattr.eval.verify.protocol import (
    Claim,
    Prover,
    Transcript,
    Verifier,
    default_queries,
    excess_statistics,
    spot_checks_needed,
)
from rlattr.eval.verify.provers import (
    DISHONEST,
    FabricatingProver,
    HonestProver,
    boost_favoured,
    fit_datamodel,
    permuted,
    random_scores,
    scaled_down,
)

__all__ = [
    "DISHONEST",
    "Claim",
    "FabricatingProver",
    "HonestProver",
    "Prover",
    "Transcript",
    "Verifier",
    "boost_favoured",
    "default_queries",
    "excess_statistics",
    "fit_datamodel",
    "permuted",
    "random_scores",
    "scaled_down",
    "spot_checks_needed",
]
