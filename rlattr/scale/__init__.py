"""The costly offline work on Ray (the optional extra ``pip install "rlattr[ray]"``).

* :class:`RayExecutor`: runs independent jobs as Ray tasks; pass it as ``executor=`` to the ground
  truth (:func:`rlattr.eval.groundtruth.leave_one_out`, ``subset_retraining``, ``final_model_gold``,
  ``run_jobs``), to :func:`sharded_cache`, :func:`attribute_blocks` and :func:`score_run`.
* :func:`sharded_cache` / :func:`sharded_features` / :func:`sharded_curvature`: featurisation and the
  influence curvature in shards of the records (``store_in_task``: the tasks write their shards).
* :func:`attribute_blocks`: scoring in query blocks; :func:`attribute_grid`: in query blocks x
  stored training shards, when the training features do not fit in one process.
* :func:`score_run`: every saved round of a run scored against a target, one job per round.

Every function also runs without an executor, in this process, with the same results bit for
bit; ``ray`` is imported only when a :class:`RayExecutor` first runs something.
"""

from rlattr.scale.executor import RayExecutor, require_ray
from rlattr.scale.runs import same_scores, score_run
from rlattr.scale.scoring import attribute_blocks, attribute_grid
from rlattr.scale.shards import (
    curvature_chunk,
    featurise,
    shard_bounds,
    sharded_cache,
    sharded_curvature,
    sharded_features,
)

__all__ = [
    "RayExecutor",
    "attribute_blocks",
    "attribute_grid",
    "curvature_chunk",
    "featurise",
    "require_ray",
    "same_scores",
    "score_run",
    "shard_bounds",
    "sharded_cache",
    "sharded_curvature",
    "sharded_features",
]
