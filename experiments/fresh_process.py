"""Run one benchmark measurement in a fresh spawned process and return what it reports.

Benchmarks measure each (setting, method) in a process of its own, so that its peak resident memory
and one-off initialisation are its own. A child that dies (an import error, a missing optional
dependency, an out-of-memory kill) must not leave the parent waiting forever on its queue: the parent
polls, and raises with the child's exit code when it is gone without an answer.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable
from typing import Any


def _child(fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    out.put(fn(*args))


def run_in_fresh_process(fn: Callable[..., Any], *args: Any, poll_s: float = 1.0) -> Any:
    """Call ``fn(*args)`` in a new spawned process and return its result (it must be picklable).

    Raises ``RuntimeError`` naming the function and the child's exit code if the child exits without
    a result.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, out))
    proc.start()
    try:
        while True:
            try:
                result = out.get(timeout=poll_s)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    try:  # the result may have arrived just before the child exited
                        result = out.get(timeout=poll_s)
                        break
                    except queue_module.Empty:
                        raise RuntimeError(
                            f"{fn.__name__}{args!r}: the benchmark process exited with code "
                            f"{proc.exitcode} and no result; its traceback is printed above"
                        ) from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return result
