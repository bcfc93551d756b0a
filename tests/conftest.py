"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Tiny tensors run faster on one thread, and several test modules pin torch at import anyway, which
# pins the whole session: pin here so that one file run alone behaves (and takes) as in the suite.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _sb3_logdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # SB3's learn() opens a logger folder under the system temp dir (SB3-<timestamp>) when no
    # tensorboard_log is given; point it inside pytest's own temp tree so runs leave nothing behind.
    previous = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3_logs"))
    yield
    if previous is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = previous
