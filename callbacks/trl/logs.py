"""Output of the TRL attribution hook, the TRL way: trainer metrics, completion tables, a run on disk.

:class:`AttributionLogger` is a ``TrainerCallback`` the mixin in :mod:`rlattr.callbacks.trl.trainer`
hands one record per scored generation batch. It

- appends the ``attr/*`` scalars to the trainer's own metrics (``trainer._metrics["train"]``), so
  TRL averages and logs them with its own on its step: they land in ``trainer.state.log_history``
  and in every ``report_to`` (TensorBoard shows them as ``train/attr/...``), and nowhere else;
- writes the score histogram and the top / bottom completion tables to TensorBoard only when the
  trainer has a TensorBoard writer (``report_to`` includes tensorboard) or ``log_dir`` was given,
  on TRL's step; with ``log_completions=True`` the tables also go beside TRL's own completion logs
  (``{output_dir}/completions/attr_top_bottom_{step}.parquet``, and wandb / trackio tables);
- saves every record under ``{output_dir}/rlattr`` (:mod:`rlattr.rl.pair_runs`) unless ``save=False``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from trl import RLOOTrainer

from rlattr.errors import RunExistsError
from rlattr.reporting.summary import markdown_table, score_summary, top_bottom
from rlattr.rl.pair_runs import PairRunWriter, batch_tensors, pair_run_metadata

TABLE_HEADER = ("index", "score", "advantage", "prompt", "completion")


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


def _cells(rows: list[dict]) -> list[list[object]]:
    return [
        [r["index"], f"{r['score']:.4g}", f"{r['advantage']:.3g}", r["prompt"], r["completion"]] for r in rows
    ]


def summary(rec: dict[str, Any]) -> dict[str, float]:
    """Scalar summaries of one record: ``{tag: value}`` (tags without the ``attr/`` prefix)."""
    return {
        **score_summary(rec["scores"], rec["advantages"], rec["keep"]),
        "target_reward": float(rec["target_reward"]),
        "seconds": float(rec["seconds"]),
        "seconds_target": float(rec["seconds_target"]),
    }


def _batch_texts(trainer: Any, n: int) -> tuple[list[Any], list[Any]]:
    """The gathered prompts and completions of the batch just generated, from TRL's own completion log.

    TRL appends every generation batch's gathered prompts and completions to ``trainer._logs`` (always,
    whatever ``log_completions`` says), in the order of the gathered scores; empty if that changed.
    """
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, dict) or len(logs.get("prompt", ())) < n or len(logs.get("completion", ())) < n:
        return [], []
    return list(logs["prompt"])[-n:], list(logs["completion"])[-n:]


class AttributionLogger(TrainerCallback):
    """Hands the hook's records to TRL's metrics, TensorBoard, completion tables and the run folder.

    Scalars (``attr/`` + :data:`rlattr.reporting.summary.SUMMARY_KEYS`, ``target_reward``, ``seconds``,
    ``seconds_target``) go through the trainer's metrics on every process (TRL logs them on the main
    one); the rest is written by the main process only.
    """

    def __init__(self, log_dir: str | None = None, save: bool = True, run_info: dict | None = None) -> None:
        self.log_dir = log_dir
        self.save = save
        self.run_info = run_info or {}
        self.writer: Any = None
        self.run_writer: PairRunWriter | None = None
        self._own_writer = False
        self._trainer: Any = None
        self._pending: list[dict[str, Any]] = []

    def bind(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def _main(self) -> bool:
        return self._trainer is not None and bool(self._trainer.accelerator.is_main_process)

    # --- TensorBoard -------------------------------------------------------------------------------
    def _open_tensorboard(self) -> None:
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer, self._own_writer = SummaryWriter(log_dir=self.log_dir), True
            return
        for cb in self._trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                self.writer, self.log_dir = cb.tb_writer, cb.tb_writer.log_dir

    def _write_tensorboard(self, step: int) -> None:
        scores = torch.cat([rec["scores"].reshape(-1) for rec in self._pending]).double()
        self.writer.add_histogram("attr/score_hist", scores.numpy(), step)
        rows = self._pending[-1]["text"]
        for end in ("top", "bottom"):
            picked = [r for r in rows if r["end"] == end]
            if picked:
                self.writer.add_text(
                    f"attr/{end}_completions", markdown_table(TABLE_HEADER, _cells(picked)), step
                )
        self.writer.flush()

    # --- beside TRL's completion logs --------------------------------------------------------------
    def _write_completion_tables(self, args: Any, step: int) -> None:
        import pandas as pd

        rows = self._pending[-1]["text"]
        if not rows:
            return
        frame = pd.DataFrame(
            {"step": [step] * len(rows), **{k: [r[k] for r in rows] for k in ("end", *TABLE_HEADER)}}
        )
        folder = Path(args.output_dir) / "completions"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / f"attr_top_bottom_{step:05d}.parquet")
        report_to = args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"attr/top_bottom": wandb.Table(dataframe=frame)})
        if "trackio" in report_to:
            import trackio

            trackio.log({"attr/top_bottom": trackio.Table(dataframe=frame)})

    # --- the run folder ----------------------------------------------------------------------------
    def _open_run(self, args: Any, global_step: int) -> None:
        root = Path(args.output_dir) / "rlattr"
        resume = global_step > 0 and (root / "run.json").is_file()
        if (root / "run.json").is_file() and not resume:
            raise RunExistsError(
                f"output_dir: {str(root)!r} already holds an rlattr run; supported: a new output_dir, "
                "resuming from a checkpoint, or save=False (--attr_save false)"
            )
        meta = pair_run_metadata(**self.run_info, trl_args=args.to_dict())
        self.run_writer = PairRunWriter(root, meta, resume=resume)

    # --- TrainerCallback events --------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        problem = None
        if self._main:
            if self.writer is None:
                self._open_tensorboard()
            if self.save and self.run_writer is None:
                try:
                    self._open_run(args, state.global_step)
                except RunExistsError as err:
                    problem = str(err)
        if self._trainer is not None and self._trainer.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [problem]
            broadcast_object_list(box, from_process=0)  # every process stops, none waits for the others
            problem = box[0]
        if problem is not None:
            raise RunExistsError(problem)
        if self.save and state.global_step > 0:  # resumed from a checkpoint: continue the round numbers
            self._continue_rounds()

    def _continue_rounds(self) -> None:
        trainer = self._trainer
        box = [self.run_writer.next_round if self.run_writer is not None else 0]
        if trainer.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box, from_process=0)
        trainer._attr_round = max(int(trainer._attr_round), int(box[0]))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self._main or not self._pending:
            return
        if self.writer is not None:
            self._write_tensorboard(state.global_step)
        if getattr(args, "log_completions", False):
            self._write_completion_tables(args, state.global_step)
        self._pending.clear()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.writer is not None and self._own_writer:
            self.writer.close()
            self.writer, self._own_writer = None, False
        elif self.writer is not None:  # TRL's TensorBoard callback closes its own writer
            self.writer = None

    def record(self, rec: dict[str, Any]) -> None:
        """Log and save one generation batch's record (see ``AttributionMixin.attribution_history``)."""
        trainer = self._trainer
        if trainer is None:
            return
        metrics = trainer._metrics["train"]
        for tag, value in summary(rec).items():
            if math.isfinite(value):
                metrics[f"attr/{tag}"].append(value)
        if not self._main:
            return
        self._pending.append(rec)
        if self.save:
            if self.run_writer is None:  # scored outside train() (e.g. a direct call)
                self._open_run(trainer.args, trainer.state.global_step)
            assert self.run_writer is not None
            prompts, completions = _batch_texts(trainer, rec["scores"].numel())
            tensors, meta = batch_tensors({**rec, "prompts": prompts, "completions": completions})
            row = {"global_step": rec["global_step"], **summary(rec)}
            self.run_writer.write_batch(int(rec["round"]), tensors, meta, row)


def run_info(trainer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``run.json`` fields the hook records beside TRL's arguments: trainer, settings, seed."""
    return {
        "trainer": type(trainer).__name__,
        "attribution": settings,
        "seed": int(trainer.args.seed),
        "num_processes": int(trainer.accelerator.num_processes),
        "hyperparameters": {
            "algorithm": "rloo" if isinstance(trainer, RLOOTrainer) else "grpo",
            "loss_type": getattr(trainer, "loss_type", None) or "rloo",
            "group_size": int(trainer.num_generations),
            "use_vllm": bool(getattr(trainer, "use_vllm", False)),
            "output_dir": os.fspath(trainer.args.output_dir),
        },
    }


__all__ = ["AttributionLogger", "run_info", "summary", "top_bottom_rows"]
