"""Independent jobs as Ray tasks: the one place rlattr imports ``ray`` (an optional extra).

:class:`RayExecutor` implements :class:`rlattr.eval.groundtruth.JobExecutor`: ``map(job, todo)``
ships ``job`` (cloudpickled once, through Ray's object store) to at most ``workers`` tasks in
flight and yields ``(j, job(j))`` as they finish. Each task pins torch to ``threads`` threads, so a
job computes the same floats in the same order as in a one-thread process: results are bit for
bit those of the single-process path. Ray is started on first use when it is not running yet
(``ray.init(address=...)``: a cluster's head, or a local instance when ``address`` is None).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import torch

from rlattr.errors import RlattrError, check_int

_T = TypeVar("_T")
_INSTALL = 'pip install "rlattr[ray]"'


def require_ray() -> ModuleType:
    """The ``ray`` module, or an :class:`RlattrError` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RlattrError(
            f"ray: got no importable ray package ({err}); supported: Ray 2.x, installed with {_INSTALL}"
        ) from err
    return ray


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# the job this worker process last deserialised, by its object id: a worker runs many tasks of one
# map, and a job that carries the records (a retraining's closure: 27 MB for 50,000 records) would
# otherwise be fetched and unpickled again for every task
_JOB_CACHE: dict[str, Callable[..., Any]] = {}


def _job(boxed: list[Any]) -> Callable[..., Any]:
    ref = boxed[0]  # boxed in a list, so Ray passes the reference instead of resolving it per task
    key = ref.hex()
    if key not in _JOB_CACHE:
        import ray

        _JOB_CACHE.clear()
        _JOB_CACHE[key] = ray.get(ref)
    return _JOB_CACHE[key]


def _run_job(boxed: list[Any], j: int, threads: int, *payload: Any) -> tuple[int, Any, int, int, float]:
    """Inside the Ray task: ``(j, job(j, *payload), pid, peak RSS bytes of this worker process,
    CPU seconds of the task)``."""
    torch.set_num_threads(threads)
    start = time.process_time()
    value = _job(boxed)(j, *payload)
    return j, value, os.getpid(), _peak_rss_bytes(), time.process_time() - start


@dataclass
class RayExecutor:
    """Runs jobs as Ray tasks, ``workers`` at a time.

    Args:
        workers: tasks running at once (each reserves ``cpus_per_task`` of Ray's CPUs).
        threads: torch threads inside each task (1 keeps the sums in the single-process order).
        address: passed to ``ray.init`` when Ray is not initialised yet (``"auto"``, ``"ray://..."``,
            or None for a local instance).
        cpus_per_task: Ray's ``num_cpus`` per task.
        queued: tasks submitted beyond ``workers``, waiting in Ray's queue for a free worker
            (they run at once where Ray has more free CPUs than ``workers`` x ``cpus_per_task``).
            0 by default: with a queue, Ray started extra worker processes here (each importing
            torch: 2.8x the CPU of one process featurising 50,000 records, docs/results/scale.md).
            Without one, the next task is submitted as soon as a task finishes, its payload
            already in the object store, before the finished task's result is fetched.

    After a ``map``, ``peak_rss`` maps each worker process id that ran a task to the highest
    peak resident memory (bytes) it reported, ``tasks`` counts the tasks run and ``cpu_seconds``
    sums the CPU time the jobs took inside them.
    """

    workers: int = 2
    threads: int = 1
    address: str | None = None
    cpus_per_task: float = 1.0
    queued: int = 0
    peak_rss: dict[int, int] = field(default_factory=dict)
    tasks: int = 0
    cpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        check_int("workers", self.workers)
        check_int("threads", self.threads)
        check_int("queued", self.queued, 0)
        if isinstance(self.cpus_per_task, bool) or not (
            isinstance(self.cpus_per_task, int | float) and self.cpus_per_task > 0
        ):
            raise RlattrError(f"cpus_per_task: got {self.cpus_per_task!r}; supported: a number > 0")
        if self.address is not None and not isinstance(self.address, str):
            raise RlattrError(f"address: got {self.address!r}; supported: None or a str for ray.init")

    def _remote(self) -> Any:
        ray = require_ray()
        if not ray.is_initialized() and self.address is not None:
            ray.init(address=self.address)  # a cluster (its head says how to log)
        elif not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        return ray, ray.remote(num_cpus=self.cpus_per_task)(_run_job)

    def map(
        self, job: Callable[..., _T], todo: Sequence[int], payload: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[int, _T]]:
        """Yield ``(j, job(j))`` (``job(j, payload(j))``) for every j of ``todo`` as the Ray tasks
        finish (any order). ``job`` goes to the object store once and is unpickled once per worker
        process (kept there for the map's later tasks); ``payload(j)`` is computed and put into the
        object store here one task ahead of its submission, and shipped with task j alone."""
        todo = list(todo)
        if not todo:
            return
        ray, remote = self._remote()
        job_ref = ray.put(job)
        pending: list[Any] = []
        queue = iter(todo)

        def prepare() -> tuple[int, tuple[Any, ...]] | None:
            j = next(queue, None)
            if j is None:
                return None
            return j, () if payload is None else (ray.put(payload(j)),)

        def submit(ready: tuple[int, tuple[Any, ...]] | None) -> tuple[int, tuple[Any, ...]] | None:
            """Submit the prepared task; return the next one, prepared (its payload already in the store)."""
            if ready is not None:
                pending.append(remote.remote([job_ref], ready[0], self.threads, *ready[1]))
            return prepare()

        ready = prepare()
        for _ in range(self.workers + self.queued):
            ready = submit(ready)
        try:
            while pending:
                done, _ = ray.wait(pending, num_returns=1)
                pending.remove(done[0])
                # the next task goes out before this result is fetched and the one after prepared:
                # the worker that just finished waits one round trip, not the driver's work too
                ready = submit(ready)
                j, value, pid, rss, cpu = ray.get(done[0])
                self.peak_rss[pid] = max(rss, self.peak_rss.get(pid, 0))
                self.tasks += 1
                self.cpu_seconds += cpu
                yield j, value
        finally:  # the caller stopped early (an error, a KeyboardInterrupt): do not leave tasks running
            for ref in pending:
                ray.cancel(ref, force=True)


__all__ = ["RayExecutor", "require_ray"]
