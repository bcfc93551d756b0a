"""The costly offline work on Ray (the optional extra ``pip install "rlattr[ray]"``).

* :class:`RayExecutor`: runs independent jobs as Ray tasks; pass it as ``executor=`` to the ground
  truth (:func:`rlattr.eval.groundtruth.leave_one_out`, ``subset_retraining``, ``final_model_gold``,
  ``run_jobs``), to :func:`sharded_cache`, :func:`attribute_blocks` and :func:`score_run`.
* :func:`sharded_cache` / :func:`attribute_blocks`: featurisation in shards, scoring in query blocks.
* :func:`score_run`: every saved round of a run scored against a target, one job per round.

Every function also runs without an executor, in this process, with the same results bit for
bit; ``ray`` is imported only when a :class:`RayExecutor` first runs something.
"""

from rlattr.scale.executor import RayExecutor, require_ray
from rlattr.scale.runs import same_scores, score_run
from rlattr.scale.shards import attribute_blocks, featurise, shard_bounds, sharded_cache

__all__ = [
    "RayExecutor",
    "attribute_blocks",
    "featurise",
    "require_ray",
    "same_scores",
    "score_run",
    "shard_bounds",
    "sharded_cache",
]
