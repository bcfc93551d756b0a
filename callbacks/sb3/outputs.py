"""What :class:`~rlattr.callbacks.sb3.InfluenceCallback` writes about each scored round.

One summary per round (``callback.history``), the round's snapshot in the run folder
(:class:`~rlattr.rl.snapshots.SnapshotWriter`), and the ``attr/*`` TensorBoard events with the
score-vs-advantage image every ``image_every`` scored rounds. A write that fails (a full disk, a
read-only folder) warns once and stops that output; training goes on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from torch import Tensor

from rlattr.reporting.summary import score_summary
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch
from rlattr.rl.snapshots import SnapshotWriter


class RoundOutputs:
    """The outputs of a scored round, mixed into :class:`~rlattr.callbacks.sb3.InfluenceCallback`
    (which sets every attribute below in its ``__init__`` and ``_init_callback``)."""

    model: PPO
    verbose: int
    run_dir: Path | None
    history: list[dict[str, Any]]
    n_scored: int
    image_every: int
    top_k: int
    last_records: RecordBatch | None
    last_probe: dict[str, Tensor]
    _writer: Any
    _snapshots: SnapshotWriter | None
    _outputs_off: set[str]

    def _stop_output(self, what: str, err: OSError) -> None:
        """A full disk or a read-only folder: warn once, stop writing ``what``, keep training."""
        if what not in self._outputs_off:
            warnings.warn(
                f"{type(self).__name__}: {err} while writing {what} into {str(self.run_dir)!r}; {what} stop "
                "here (the scores stay in callback.history) and training goes on",
                UserWarning,
                stacklevel=2,
            )
        self._outputs_off.add(what)

    def _write_snapshot(self, records: RecordBatch, scores: RoundScores, summary: dict[str, Any]) -> int:
        assert self._snapshots is not None
        theta = {n: p.detach().cpu().clone() for n, p in self.model.policy.state_dict().items()}
        extra = {k: v for k, v in self.last_probe.items() if k in ("probe_scores", "probe_logp")}
        if self.last_probe and not self.history:  # the probes themselves, once, with the first round
            extra.update({k: v for k, v in self.last_probe.items() if k.startswith("probe_observations")})
            extra["probe_actions"] = self.last_probe["probe_actions"]
        return self._snapshots.write_round(records, scores, theta, summary, extra)

    def _image_due(self) -> bool:
        """Whether this scored round gets the score-vs-advantage image: the image_every-th, 2 *
        image_every-th, ... scored round. Not round 0: a run shorter than image_every rounds never
        imports matplotlib nor draws a figure (about 70 % of the callback's one-off start-up)."""
        return (self.n_scored + 1) % self.image_every == 0

    def _record_round(self, scores: RoundScores) -> None:
        records = self.last_records
        assert records is not None
        s = scores.scores if scores.scores.dim() == 1 else scores.scores.mean(0)
        summary: dict[str, Any] = {
            "round": records.round_index,
            "timesteps": int(self.model.num_timesteps),
            "n_records": len(records),
            **score_summary(s, records.advantages),
            "seconds": scores.seconds,
        }
        if self.last_probe:
            summary["probe_net"] = self.last_probe["probe_scores"].sum(1).tolist()
            summary["probe_logp"] = self.last_probe["probe_logp"].tolist()
        if self._snapshots is not None and "snapshots" not in self._outputs_off:
            try:
                summary["disk_bytes"] = self._write_snapshot(records, scores, summary)
            except OSError as err:
                self._stop_output("snapshots", err)
        if self._writer is not None and "TensorBoard events" not in self._outputs_off:
            image = self._image_due()
            try:
                self._writer.log_round(
                    self.model.num_timesteps, records, scores, summary, self.top_k, image=image
                )
            except OSError as err:
                self._stop_output("TensorBoard events", err)
        self.history.append(summary)
        self.n_scored += 1
        if self.verbose >= 1:
            print(
                f"[rlattr] round {summary['round']}: {summary['n_records']} records scored in "
                f"{summary['seconds']:.3f}s, positive fraction {summary['positive_fraction']:.2f}"
            )

    def _flush_tensorboard(self) -> None:
        if self._writer is not None and "TensorBoard events" not in self._outputs_off:
            try:
                self._writer.flush()
            except OSError as err:
                self._stop_output("TensorBoard events", err)


__all__ = ["RoundOutputs"]
