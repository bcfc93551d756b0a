"""TensorBoard output of the TRL attribution hook: ``attr/*`` tags in the trainer's own log folder.

:class:`AttributionLogger` is a ``TrainerCallback``: it reuses the ``SummaryWriter`` of the
trainer's ``TensorBoardCallback`` when there is one (same folder, same event file), or opens its own
in ``log_dir`` (default ``<output_dir>/runs``). The mixin in :mod:`rlattr.callbacks.trl.trainer` hands it
one record per generation batch; only the main process writes.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import Tensor
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from rlattr.reporting.summary import markdown_table, score_summary, top_bottom


def _decode(tokenizer: Any, ids: Tensor, mask: Tensor) -> str:
    return tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)


def top_bottom_rows(trainer: Any, out: dict[str, Any], scores: Tensor, mine: slice, k: int) -> list[dict]:
    """The k best- and k worst-scored pairs of the generation batch, decoded, on every process.

    Args:
        out: TRL's local generation batch (before filtering).
        scores: ``Tensor[n_global]`` gathered scores; ``mine`` is this process's slice of them.

    Returns: dicts ``{index, score, advantage, prompt, completion, end}``, ``end`` "top" or "bottom".
    """
    if k <= 0:
        return []
    wanted = {g: end for end, _, g in top_bottom(scores, k)}
    tok = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    rows = []
    for g, end in wanted.items():
        if not mine.start <= g < mine.stop:
            continue
        i = g - mine.start
        rows.append(
            {
                "index": g,
                "score": float(scores[g]),
                "advantage": float(out["advantages"][i]),
                "prompt": _decode(tok, out["prompt_ids"][i], out["prompt_mask"][i]),
                "completion": _decode(tok, out["completion_ids"][i], out["completion_mask"][i]),
                "end": end,
            }
        )
    if trainer.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return sorted(rows, key=lambda r: -r["score"])


def _table(rows: list[dict]) -> str:
    cells = [
        [r["index"], f"{r['score']:.4g}", f"{r['advantage']:.3g}", r["prompt"], r["completion"]] for r in rows
    ]
    return markdown_table(("index", "score", "advantage", "prompt", "completion"), cells)


class AttributionLogger(TrainerCallback):
    """Writes the hook's records as ``attr/*`` TensorBoard tags (main process only).

    Scalars: ``attr/score_mean``, ``attr/score_std``, ``attr/positive_fraction``, ``attr/kept_fraction``,
    ``attr/n_dropped``, ``attr/score_adv_corr``, ``attr/target_reward``, ``attr/seconds``,
    ``attr/seconds_target``; ``attr/score_hist`` (histogram); ``attr/top_completions`` and
    ``attr/bottom_completions`` (text tables).
    """

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        self.writer: Any = None
        self._own_writer = False
        self._trainer: Any = None

    def bind(self, trainer: Any) -> None:
        self._trainer = trainer

    def _open(self, args: Any) -> None:
        for cb in self._trainer.callback_handler.callbacks if self._trainer is not None else []:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None and self.log_dir is None:
                self.writer, self.log_dir = cb.tb_writer, cb.tb_writer.log_dir
                return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.log_dir or os.path.join(args.output_dir, "runs")
        self.writer, self._own_writer = SummaryWriter(log_dir=self.log_dir), True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.writer is None:
            self._open(args)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.flush()
            if self._own_writer:
                self.writer.close()
                self.writer, self._own_writer = None, False

    def record(self, rec: dict[str, Any]) -> None:
        """Write one generation batch's record (see ``AttributionMixin.attribution_history``)."""
        trainer = self._trainer
        if trainer is None or not trainer.accelerator.is_main_process:
            return
        if self.writer is None:
            self._open(trainer.args)
        for tag, value in summary(rec).items():
            if math.isfinite(value):
                self.writer.add_scalar(f"attr/{tag}", value, rec["global_step"])
        self.writer.add_histogram("attr/score_hist", rec["scores"].double().numpy(), rec["global_step"])
        for end in ("top", "bottom"):
            rows = [r for r in rec["text"] if r["end"] == end]
            if rows:
                self.writer.add_text(f"attr/{end}_completions", _table(rows), rec["global_step"])


def summary(rec: dict[str, Any]) -> dict[str, float]:
    """Scalar summaries of one record: ``{tag: value}`` (tags without the ``attr/`` prefix)."""
    return {
        **score_summary(rec["scores"], rec["advantages"], rec["keep"]),
        "target_reward": float(rec["target_reward"]),
        "seconds": float(rec["seconds"]),
        "seconds_target": float(rec["seconds_target"]),
    }


__all__ = ["AttributionLogger", "summary", "top_bottom_rows"]
