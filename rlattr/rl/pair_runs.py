"""RLHF runs on disk: every scored generation batch of the TRL hook, in the SB3 runs' store format.

Layout of ``{output_dir}/rlattr/`` (the same as :mod:`rlattr.rl.snapshots`; ``run.json`` has
``"kind": "rlhf"``, which is how :func:`rlattr.rl.snapshots.load_run` tells the two apart)::

    run.json                          trainer, attribution settings, TRL arguments, versions
    rounds.jsonl                      one summary line per generation batch (score_mean ... target_reward)
    round_00007/scores.safetensors    scores, advantages, keep, ids of the batch's pairs; its metadata
                                      holds the prompt and completion texts and the batch's step

A "round" here is one generation batch. A pair's id is ``(round, group, member)``: the prompt group
(``position // group_size`` in the gathered batch, TRL's own grouping for advantages) and the
completion's place in it. Every file goes through :mod:`rlattr.core.store` (atomic, versioned).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlattr.core.store import load_tensors, save_tensors
from rlattr.errors import StoreError
from rlattr.rl.snapshots import AttributionRun, SnapshotWriter, round_folder_name, run_metadata

RUN_KIND = "rlhf"


def pair_ids(round_index: int, n: int, group_size: int) -> Tensor:
    """``Tensor[n, 3]`` int64: ``(round, group, member)`` of the pairs of one gathered generation batch."""
    pos = torch.arange(n, dtype=torch.int64)
    return torch.stack([torch.full_like(pos, round_index), pos // group_size, pos % group_size], dim=1)


def format_pair_id(pid: Tensor | tuple[int, int, int]) -> str:
    """``"b{round}/g{group}/c{member}"``: the printable form of a pair id."""
    b, g, c = (int(x) for x in pid)
    return f"b{b}/g{g}/c{c}"


def _text(value: Any) -> str:
    """A prompt or completion as text: strings as they are, chat messages as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def pair_run_metadata(**fields: Any) -> dict[str, Any]:
    """``run.json`` of an RLHF run: the given fields plus kind, format and versions."""
    return run_metadata(kind=RUN_KIND, **fields)


class PairRunWriter(SnapshotWriter):
    """Writes one folder per scored generation batch under ``root`` (the run's ``rlattr`` folder).

    Shares :class:`~rlattr.rl.snapshots.SnapshotWriter`'s run.json, append-only round index, disk
    accounting and ``keep_rounds`` retention; refuses a folder that already holds a run.
    """

    def write_batch(
        self,
        round_index: int,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        summary: dict[str, Any],
    ) -> int:
        """Write one generation batch; returns the bytes used by the ``rlattr`` folder afterwards.

        Args:
            tensors: ``scores``, ``advantages``, ``keep`` (``Tensor[n]``) and ``ids`` (``Tensor[n, 3]``).
            meta: JSON-ready metadata stored in the same file (texts, step, target reward ...).
            summary: the line appended to ``rounds.jsonl`` (``round`` is added).
        """
        folder = self.root / round_folder_name(round_index)
        doc = {"round": round_index, **meta}
        self._put(folder / "scores.safetensors", lambda p: save_tensors(p, tensors, doc))
        self._n += 1
        self._scored.append(round_index)
        self._prune()
        clean = {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()}
        line = {"round": round_index, **clean, "disk_bytes": self._bytes}
        self._append_index((json.dumps(line, sort_keys=True, default=str) + "\n").encode())
        return self._bytes


@dataclass
class PairBatch:
    """One generation batch read back: every pair's id, texts, score, advantage and kept flag.

    ``scores``, ``advantages``: ``Tensor[n]`` float; ``keep``: ``Tensor[n]`` bool; ``ids``: ``Tensor[n, 3]``.
    """

    round: int
    global_step: int
    scores: Tensor
    advantages: Tensor
    keep: Tensor
    ids: Tensor
    prompts: list[str]
    completions: list[str]
    target_reward: float
    note: str


def _strings(meta: dict[str, Any], key: str, n: int, where: str) -> list[str]:
    values = meta.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise StoreError(f"{where}: {key!r} must be a list of strings")
    if values and len(values) != n:
        raise StoreError(f"{where}: {len(values)} {key} for {n} pairs")
    return values or [""] * n


def _finite(value: Any) -> float | None:
    """A float for JSON, ``None`` for NaN / inf (strict JSON has neither)."""
    x = float(value)
    return x if math.isfinite(x) else None


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


class PairRun(AttributionRun):
    """An RLHF run read back (from :func:`rlattr.load_run`). ``rounds`` lists the generation batches.

    ``scores(k)`` / ``advantages(k)`` work as for SB3 runs; :meth:`batch` adds texts and kept flags.
    """

    def batch(self, k: int) -> PairBatch:
        """Generation batch ``k`` with its texts; raises :class:`StoreError` if the file is malformed."""
        path = self._folder(k) / "scores.safetensors"
        tensors, meta = load_tensors(path)
        where = f"round {k}"
        missing = [name for name in ("scores", "advantages", "keep", "ids") if name not in tensors]
        if missing:
            raise StoreError(f"{where}: the scores file lacks {missing}")
        n = tensors["scores"].numel()
        if any(tensors[name].shape[0] != n for name in ("advantages", "keep", "ids")):
            raise StoreError(f"{where}: scores, advantages, keep and ids differ in length")
        return PairBatch(
            round=k,
            global_step=int(_number(meta.get("global_step"), -1)),
            scores=tensors["scores"],
            advantages=tensors["advantages"],
            keep=tensors["keep"].bool(),
            ids=tensors["ids"],
            prompts=_strings(meta, "prompts", n, where),
            completions=_strings(meta, "completions", n, where),
            target_reward=_number(meta.get("target_reward"), math.nan),
            note=str(meta.get("note", "")),
        )


def batch_tensors(record: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of one hook record (``AttributionMixin``'s per-batch dict) as stored."""
    scores = record["scores"].detach().float().cpu()
    n = scores.numel()
    tensors = {
        "scores": scores,
        "advantages": record["advantages"].detach().float().cpu(),
        "keep": record["keep"].detach().bool().cpu(),
        "ids": pair_ids(int(record["round"]), n, int(record["group_size"])),
    }
    meta = {
        "global_step": int(record["global_step"]),
        "group_size": int(record["group_size"]),
        "target_reward": _finite(record["target_reward"]),
        "seconds": float(record["seconds"]),
        "seconds_target": float(record["seconds_target"]),
        "note": str(record.get("note", "")),
        "prompts": [_text(p) for p in record.get("prompts", [])],
        "completions": [_text(c) for c in record.get("completions", [])],
    }
    return tensors, meta


__all__ = [
    "RUN_KIND",
    "PairBatch",
    "PairRun",
    "PairRunWriter",
    "batch_tensors",
    "format_pair_id",
    "pair_ids",
    "pair_run_metadata",
]
