"""The benchmarks' fresh-process runner returns the child's result, and fails (never hangs) when it dies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from fresh_process import run_in_fresh_process  # noqa: E402


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _dies(code: int) -> None:
    os._exit(code)  # no result, no exception: what an OOM kill or a segfault looks like to the parent


def test_returns_the_child_result_from_another_process():
    value, pid = run_in_fresh_process(_square_and_pid, 7)
    assert value == 49
    assert pid != os.getpid()


def test_a_dead_child_raises_with_its_exit_code():
    with pytest.raises(RuntimeError, match="exited with code 3"):
        run_in_fresh_process(_dies, 3, poll_s=0.2)
