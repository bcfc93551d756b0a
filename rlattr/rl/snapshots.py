"""Per-round snapshots on disk, and reading a run back (:func:`load_run`).

Layout of ``{run_dir}/rlattr/``::

    run.json                          what produced the run: target, PPO hyperparameters, versions
    rounds.jsonl                      one summary line per scored round (mean, std, seconds, disk ...),
                                      appended; a torn last line (a kill mid-write) is skipped
    round_00007/scores.safetensors    scores, ids, advantages (+ by_group): always kept
    round_00007/records.safetensors   the RecordBatch       } full snapshot: every k-th scored round,
    round_00007/theta.safetensors     the policy at theta(k) } at most ``keep_last`` of them

Every file goes through :mod:`rlattr.core.store` (safetensors + JSON metadata, atomic, versioned).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from rlattr.core.store import atomic_write_bytes, load_json, load_tensors, save_json, save_tensors
from rlattr.errors import MissingError, RunExistsError, StoreError
from rlattr.provenance import provenance
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch

SNAPSHOT_FORMAT = 1
ROUND_INDEX = "rounds.jsonl"
_ROUND_DIR = re.compile(r"round_(\d{5,9})")
_META_MAPPINGS = ("hyperparameters", "target", "callback", "versions")


def run_metadata(**fields: Any) -> dict[str, Any]:
    """The run's metadata document: the given fields, the format and :func:`rlattr.provenance.provenance`."""
    return {"snapshot_format": SNAPSHOT_FORMAT, "versions": provenance(), **fields}


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (one walk of the tree)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def round_folder_name(k: int) -> str:
    return f"round_{k:05d}"


class SnapshotWriter:
    """Writes one folder per scored round under ``root`` and applies the retention policy.

    Args:
        root: the ``rlattr`` folder of the run. meta: the run's metadata (``run.json``).
        every: keep records + theta of every ``every``-th scored round.
        keep_last: keep at most this many full snapshots (``None``: all).
        keep_rounds: keep the folders (scores included) of at most this many recent rounds; older
            ones are deleted whole, their summaries stay in ``rounds.jsonl`` (``None``: all).
        resume: continue the run already in ``root`` (after a kill) instead of refusing it.

    The round index ``rounds.jsonl`` is appended one line per round (no rewrite); disk use is
    counted as files are written and deleted, so a round costs the same at round 10 and 10,000.
    """

    def __init__(
        self,
        root: str | Path,
        meta: dict[str, Any],
        *,
        every: int = 1,
        keep_last: int | None = None,
        keep_rounds: int | None = None,
        resume: bool = False,
    ) -> None:
        self.root = Path(root)
        exists = (self.root / "run.json").exists()
        if exists and not resume:
            raise RunExistsError(
                f"root: {str(self.root)!r} already holds an rlattr run; use a new run folder"
            )
        if resume and not exists:
            raise MissingError(f"root: {str(self.root)!r} holds no rlattr run to resume")
        self.root.mkdir(parents=True, exist_ok=True)
        self.every, self.keep_last, self.keep_rounds = every, keep_last, keep_rounds
        self.meta = meta
        self._full: list[Path] = []
        self._scored: list[int] = []
        self._extra: dict[int, list[Path]] = {}
        self._n = 0
        if resume:
            self.meta = load_json(self.root / "run.json")
            self._scored = _scored_rounds(self.root)[0]
            self._full = [self.root / round_folder_name(k) for k in self._scored]
            self._full = [f for f in self._full if (f / "records.safetensors").is_file()]
            self._n = len(self._scored)
        self._bytes = dir_bytes(self.root)  # the only walk; from here on every write is counted
        if not resume:
            self._put(self.root / "run.json", lambda p: save_json(p, meta))

    @property
    def disk_bytes(self) -> int:
        """Bytes used by the ``rlattr`` folder, counted as files are written and deleted."""
        return self._bytes

    @property
    def next_round(self) -> int:
        """The round after the last one written (0 for a new run)."""
        return self._scored[-1] + 1 if self._scored else 0

    def _put(self, path: Path, write: Any) -> None:
        old = _size(path)
        write(path)
        self._bytes += _size(path) - old

    def write_json(self, relpath: str, obj: Any, *, round_index: int | None = None) -> Path:
        """Atomically write ``obj`` at ``root/relpath``; with ``round_index`` the file is pruned with
        that round's folder by ``keep_rounds``."""
        path = self.root / relpath
        self._put(path, lambda p: save_json(p, obj))
        if round_index is not None:
            self._extra.setdefault(round_index, []).append(path)
        return path

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
        folder = self.root / round_folder_name(k)
        if self._n % self.every == 0:
            self._put(
                folder / "records.safetensors", lambda p: save_tensors(p, records.to_tensors(), {"round": k})
            )
            self._put(folder / "theta.safetensors", lambda p: save_tensors(p, theta, {"round": k}))
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
        self._put(folder / "scores.safetensors", lambda p: save_tensors(p, tensors, meta))
        self._n += 1
        self._scored.append(k)
        self._prune()
        line = (
            json.dumps({**summary, "disk_bytes": self._bytes}, sort_keys=True, default=str) + "\n"
        ).encode()
        self._append_index(line)
        return self._bytes

    def discard_from(self, k: int) -> None:
        """Forget rounds ``>= k`` (scored after the checkpoint a resumed run restarts from): their
        folders are deleted and ``rounds.jsonl`` is rewritten once without them."""
        for j in [j for j in self._scored if j >= k]:
            self._drop_round(j)
        self._scored = [j for j in self._scored if j < k]
        self._n = len(self._scored)
        index = self.root / ROUND_INDEX
        if index.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn line is dropped by the rewrite
                kept = [
                    e
                    for e in _read_index(self.root)
                    if not (isinstance(e.get("round"), int) and e["round"] >= k)
                ]
            text = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in kept).encode()
            self._put(index, lambda p: atomic_write_bytes(p, text))

    def _append_index(self, line: bytes) -> None:
        path = self.root / ROUND_INDEX
        old = _size(path)
        with path.open("ab") as fh:
            if old and _last_byte(path) != b"\n":  # a torn line from a kill: end it, never extend it
                line = b"\n" + line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._bytes += len(line)

    def _remove(self, path: Path) -> None:
        size = _size(path)
        path.unlink(missing_ok=True)
        self._bytes -= size

    def _prune(self) -> None:
        if self.keep_last is not None:
            while len(self._full) > self.keep_last:
                old = self._full.pop(0)
                for name in ("records.safetensors", "theta.safetensors"):
                    self._remove(old / name)
        if self.keep_rounds is not None:
            while len(self._scored) > self.keep_rounds:
                self._drop_round(self._scored.pop(0))

    def _drop_round(self, k: int) -> None:
        """Delete round ``k``'s folder and the files registered with it (its summary line stays)."""
        folder = self.root / round_folder_name(k)
        # per-round files beside the folders (iif/round_00007.json), also from before a resume
        companions = self.root.glob(f"*/{round_folder_name(k)}.json")
        for path in {*folder.glob("*"), *self._extra.pop(k, []), *companions}:
            if path.is_file():
                self._remove(path)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        self._full = [f for f in self._full if f != folder]


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _scored_rounds(root: Path) -> tuple[list[int], list[str]]:
    """Rounds whose folder holds a scores file, and the names of ``round_*`` entries that are not
    round folders (``round_00003.bak``, ``round_abc``)."""
    rounds, stray = [], []
    for d in root.glob("round_*"):
        match = _ROUND_DIR.fullmatch(d.name)
        if match is None or not d.is_dir():
            stray.append(d.name)
        elif (d / "scores.safetensors").is_file():
            rounds.append(int(match.group(1)))
    return sorted(rounds), sorted(stray)


def _read_index(root: Path) -> list[dict[str, Any]]:
    """The round summaries: ``rounds.jsonl`` (lines that do not parse are skipped with a warning),
    else the ``rounds.json`` list of older runs."""
    path = root / ROUND_INDEX
    if path.is_file():
        out, bad = [], 0
        for line in path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None
            if isinstance(entry, dict):
                out.append(entry)
            elif line.strip():
                bad += 1
        if bad:
            _warn(f"{ROUND_INDEX}: skipped {bad} unreadable line(s) (a torn write from a killed run?)")
        return out
    legacy = root / "rounds.json"
    if not legacy.is_file():
        return []
    try:
        entries = load_json(legacy)
    except StoreError as err:
        _warn(f"rounds.json: skipped ({err})")
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        _warn(f"rounds.json: skipped (expected a list of objects, got {type(entries).__name__})")
        return []
    return entries


@dataclass
class AttributionRun:
    """A run read back from disk. ``rounds`` lists the scored rounds; full snapshots may be pruned."""

    root: Path
    meta: dict[str, Any]
    summaries: list[dict[str, Any]]
    rounds: list[int]

    def _folder(self, k: int) -> Path:
        if k not in self.rounds:
            raise MissingError(
                f"round: {k} was not scored in this run or was pruned; scored rounds: {self.rounds[:10]}..."
            )
        return self.root / round_folder_name(k)

    def scores(self, k: int) -> RoundScores:
        """The round's scores, ids and (if computed) per-group parts."""
        tensors, meta = load_tensors(self._folder(k) / "scores.safetensors")
        if "scores" not in tensors or "ids" not in tensors:
            raise StoreError(f"round: the scores file of round {k} lacks 'scores' or 'ids'")
        group_names, target = meta.get("group_names", []), meta.get("target", {})
        return RoundScores(
            scores=tensors["scores"],
            ids=tensors["ids"],
            by_group=tensors.get("by_group"),
            group_names=[str(g) for g in group_names] if isinstance(group_names, list) else [],
            seconds=float(meta["seconds"]) if isinstance(meta.get("seconds"), int | float) else 0.0,
            target=dict(target) if isinstance(target, dict) else {},
        )

    def score_tensors(self, k: int) -> dict[str, Tensor]:
        """Every tensor stored beside the round's scores (advantages, probe_scores, probe_logp ...)."""
        return load_tensors(self._folder(k) / "scores.safetensors")[0]

    def advantages(self, k: int) -> Tensor:
        tensors = self.score_tensors(k)
        if "advantages" not in tensors:
            raise StoreError(f"round: the scores file of round {k} lacks 'advantages'")
        return tensors["advantages"]

    def has_snapshot(self, k: int) -> bool:
        return (self._folder(k) / "records.safetensors").is_file()

    def snapshot_rounds(self) -> list[int]:
        """The scored rounds whose full snapshot (records and theta) is still on disk, in round order."""
        return [k for k in self.rounds if self.has_snapshot(k)]

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
    """Read a run back: ``path`` is the run folder (SB3's log dir) or its ``rlattr`` subfolder.

    A received run is untrusted: JSON is type-checked, names are matched against the round-folder
    pattern (anything else is skipped with a warning) and tensors are read from safetensors only.
    """
    p = Path(path)
    root = p if (p / "run.json").is_file() else p / "rlattr"
    if not (root / "run.json").is_file():
        raise StoreError(f"path: {str(p)!r} holds no rlattr run (no run.json in it or in its rlattr/ folder)")
    meta = load_json(root / "run.json")
    if not isinstance(meta, dict):
        raise StoreError(f"run.json: expected a JSON object, got {type(meta).__name__} (in {str(root)!r})")
    fmt = meta.get("snapshot_format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > SNAPSHOT_FORMAT:
        raise StoreError(
            f"path: snapshot format {fmt!r}; this rlattr reads up to {SNAPSHOT_FORMAT}: upgrade rlattr"
        )
    for key in _META_MAPPINGS:  # readers call .get on these: a received run may hold anything
        if key in meta and not isinstance(meta[key], dict):
            _warn(f"run.json: {key!r} ignored (expected an object, got {type(meta[key]).__name__})")
            meta[key] = {}
    rounds, stray = _scored_rounds(root)
    if stray:
        _warn(f"path: ignored {len(stray)} entries that are not round folders: {stray[:5]}")
    if meta.get("kind") == "rlhf":  # written by the TRL hook: one round per generation batch
        from rlattr.rl.pair_runs import PairRun

        return PairRun(root=root, meta=meta, summaries=_read_index(root), rounds=rounds)
    return AttributionRun(root=root, meta=meta, summaries=_read_index(root), rounds=rounds)


__all__ = ["AttributionRun", "SnapshotWriter", "dir_bytes", "load_run", "run_metadata"]
