"""Per-round snapshots on disk, and reading a run back (:func:`load_run`).

Layout of ``{run_dir}/rlattr/``::

    run.json                          what produced the run: target, PPO hyperparameters, versions
    rounds.json                       one summary per scored round (mean, std, seconds, disk ...)
    round_00007/scores.safetensors    scores, ids, advantages (+ by_group): always kept
    round_00007/records.safetensors   the RecordBatch       } full snapshot: every k-th scored round,
    round_00007/theta.safetensors     the policy at theta(k) } at most ``keep_last`` of them

Every file goes through :mod:`rlattr.core.store` (safetensors + JSON metadata, atomic, versioned).
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from rlattr.core.store import load_json, load_tensors, save_json, save_tensors
from rlattr.errors import MissingError, RunExistsError, StoreError
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch

SNAPSHOT_FORMAT = 1


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shape the numbers (and the rlattr git commit, if any)."""
    import importlib.metadata as md

    import rlattr

    out: dict[str, str | None] = {"rlattr": rlattr.__version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "stable-baselines3", "gymnasium", "trl", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = _git_commit()
    return out


def run_metadata(**fields: Any) -> dict[str, Any]:
    """The run's metadata document: the given fields plus format and versions."""
    return {"snapshot_format": SNAPSHOT_FORMAT, "versions": versions(), **fields}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class SnapshotWriter:
    """Writes one folder per scored round under ``root`` and applies the retention policy.

    Args:
        root: the ``rlattr`` folder of the run. meta: the run's metadata (``run.json``).
        every: keep records + theta of every ``every``-th scored round.
        keep_last: keep at most this many full snapshots (``None``: all).
    """

    def __init__(
        self, root: str | Path, meta: dict[str, Any], *, every: int = 1, keep_last: int | None = None
    ) -> None:
        self.root = Path(root)
        if (self.root / "run.json").exists():
            raise RunExistsError(
                f"root: {str(self.root)!r} already holds an rlattr run; use a new run folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.every, self.keep_last = every, keep_last
        self.meta = meta
        self.summaries: list[dict[str, Any]] = []
        self._full: list[Path] = []
        self._n = 0
        save_json(self.root / "run.json", meta)

    def write_round(
        self,
        records: RecordBatch,
        scores: RoundScores,
        theta: dict[str, Tensor],
        summary: dict[str, Any],
        extra: dict[str, Tensor] | None = None,
    ) -> int:
        """Write the round; returns the bytes used by the whole ``rlattr`` folder afterwards.

        ``extra`` tensors (e.g. ``probe_scores: Tensor[m, n]``) are stored beside the scores.
        """
        k = records.round_index
        folder = self.root / f"round_{k:05d}"
        if self._n % self.every == 0:
            save_tensors(folder / "records.safetensors", records.to_tensors(), {"round": k})
            save_tensors(folder / "theta.safetensors", theta, {"round": k})
            self._full.append(folder)
        tensors = {"scores": scores.scores, "ids": scores.ids, "advantages": records.advantages}
        if scores.by_group is not None:
            tensors["by_group"] = scores.by_group
        tensors.update(extra or {})
        meta = {
            "round": k,
            "target": scores.target,
            "group_names": scores.group_names,
            "seconds": scores.seconds,
        }
        # scores are written last: a round folder with scores.safetensors is complete.
        save_tensors(folder / "scores.safetensors", tensors, meta)
        self._n += 1
        self._prune()
        used = dir_bytes(self.root)
        self.summaries.append({**summary, "disk_bytes": used})
        save_json(self.root / "rounds.json", self.summaries)
        return used

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        while len(self._full) > self.keep_last:
            old = self._full.pop(0)
            for name in ("records.safetensors", "theta.safetensors"):
                (old / name).unlink(missing_ok=True)


@dataclass
class AttributionRun:
    """A run read back from disk. ``rounds`` lists the scored rounds; full snapshots may be pruned."""

    root: Path
    meta: dict[str, Any]
    summaries: list[dict[str, Any]]
    rounds: list[int]

    def _folder(self, k: int) -> Path:
        if k not in self.rounds:
            raise MissingError(f"round: {k} was not scored in this run; scored rounds: {self.rounds[:10]}...")
        return self.root / f"round_{k:05d}"

    def scores(self, k: int) -> RoundScores:
        """The round's scores, ids and (if computed) per-group parts."""
        tensors, meta = load_tensors(self._folder(k) / "scores.safetensors")
        return RoundScores(
            scores=tensors["scores"],
            ids=tensors["ids"],
            by_group=tensors.get("by_group"),
            group_names=list(meta.get("group_names", [])),
            seconds=float(meta.get("seconds", 0.0)),
            target=dict(meta.get("target", {})),
        )

    def score_tensors(self, k: int) -> dict[str, Tensor]:
        """Every tensor stored beside the round's scores (advantages, probe_scores, probe_logp ...)."""
        return load_tensors(self._folder(k) / "scores.safetensors")[0]

    def advantages(self, k: int) -> Tensor:
        return self.score_tensors(k)["advantages"]

    def has_snapshot(self, k: int) -> bool:
        return (self._folder(k) / "records.safetensors").is_file()

    def records(self, k: int) -> RecordBatch:
        path = self._folder(k) / "records.safetensors"
        if not path.is_file():
            raise MissingError(f"round: the records of round {k} were pruned by the retention policy")
        return RecordBatch.from_tensors(load_tensors(path)[0])

    def theta(self, k: int) -> dict[str, Tensor]:
        path = self._folder(k) / "theta.safetensors"
        if not path.is_file():
            raise MissingError(f"round: theta of round {k} was pruned by the retention policy")
        return load_tensors(path)[0]

    @property
    def disk_bytes(self) -> int:
        return dir_bytes(self.root)


def load_run(path: str | Path) -> AttributionRun:
    """Read a run back: ``path`` is the run folder (SB3's log dir) or its ``rlattr`` subfolder."""
    p = Path(path)
    root = p if (p / "run.json").is_file() else p / "rlattr"
    if not (root / "run.json").is_file():
        raise StoreError(f"path: {str(p)!r} holds no rlattr run (no run.json in it or in its rlattr/ folder)")
    meta = load_json(root / "run.json")
    fmt = meta.get("snapshot_format")
    if not isinstance(fmt, int) or fmt > SNAPSHOT_FORMAT:
        raise StoreError(
            f"path: snapshot format {fmt!r}; this rlattr reads up to {SNAPSHOT_FORMAT}: upgrade rlattr"
        )
    summaries = load_json(root / "rounds.json") if (root / "rounds.json").is_file() else []
    rounds = sorted(
        int(d.name.split("_")[1]) for d in root.glob("round_*") if (d / "scores.safetensors").is_file()
    )
    return AttributionRun(root=root, meta=meta, summaries=summaries, rounds=rounds)


__all__ = ["AttributionRun", "SnapshotWriter", "load_run", "run_metadata", "versions"]
