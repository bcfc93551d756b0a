"""One local Ray instance for every Ray test of this folder (starting Ray costs seconds), shut down after it."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

_REASON = 'ray is not installed (the optional extra: pip install "rlattr[ray]"); make test installs it'


@pytest.fixture(scope="package")  # shut down when tests/scale is done
def ray_local() -> Iterator[ModuleType]:
    """``ray``, initialised with 2 CPUs; torch on one thread here, as in every Ray task, so that
    the single-process reference computes its sums in the same order."""
    ray = pytest.importorskip("ray", reason=_REASON)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
