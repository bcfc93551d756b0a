"""The offline training-data-attribution core: knows nothing of RL."""

from rlattr.core.grads import (
    batch_size,
    directional_scores,
    flatten,
    group_dots,
    iter_per_record_grads,
    loss_grads_sum,
    per_record_grads,
    slice_batch,
    target_grads,
)
from rlattr.core.projection import RandomProjection
from rlattr.core.store import StoreError, load_json, load_metadata, load_tensors, save_json, save_tensors
from rlattr.core.task import Task

__all__ = [
    "RandomProjection",
    "StoreError",
    "Task",
    "batch_size",
    "directional_scores",
    "flatten",
    "group_dots",
    "iter_per_record_grads",
    "load_json",
    "load_metadata",
    "load_tensors",
    "loss_grads_sum",
    "per_record_grads",
    "save_json",
    "save_tensors",
    "slice_batch",
    "target_grads",
]
