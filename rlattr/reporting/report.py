"""``rlattr report RUN``: PNG plots and an index.html from a run's snapshots.

Sections: per-round summary curves (positive fraction, mean, std, seconds, disk), the score
distribution of every round, score against advantage for the last round, the top and bottom
records of recent rounds, and behaviour formation (when the run has probes): for each probed
(state, action), log pi(a|s) at theta(k) and the net influence of each round's records on it.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from rlattr.errors import RlattrError
from rlattr.reporting.plots import save, score_distributions, score_vs_advantage, summary_curves
from rlattr.reporting.summary import html_table, summary_value, top_bottom
from rlattr.reporting.tensorboard import RECORD_HEADER, record_rows
from rlattr.reporting.validity import validity_section
from rlattr.rl.records import format_id
from rlattr.rl.snapshots import AttributionRun, load_run

_STYLE = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
_STYLE += "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}"


def _table(run: AttributionRun, k: int, top_k: int) -> str:
    scores = run.scores(k)
    s = scores.scores if scores.scores.dim() == 1 else scores.scores.mean(0)
    records = run.records(k) if run.has_snapshot(k) else None
    rows = record_rows(records, s, top_k, advantages=run.advantages(k))
    if records is None:  # ids still come from the scores file
        for row, (_, _, j) in zip(rows, top_bottom(s, top_k), strict=True):
            row[1] = format_id(scores.ids[j])
    return f"<h3>round {int(k)}</h3>{html_table(RECORD_HEADER, rows)}"


def _behaviour(run: AttributionRun, out: Path) -> str:
    rounds = [r for r in run.rounds if "probe_scores" in run.score_tensors(r)]
    if not rounds:
        return "<p>No probes in this run (pass <code>probe_states=m</code> to InfluenceCallback).</p>"
    logp = torch.stack([run.score_tensors(r)["probe_logp"] for r in rounds])  # [R, m]
    net = torch.stack([run.score_tensors(r)["probe_scores"].sum(1) for r in rounds])  # [R, m]
    series = {f"probe {j}: log pi(a|s)": logp[:, j].tolist() for j in range(logp.shape[1])}
    save(summary_curves(rounds, series), str(out / "behaviour_logp.png"))
    series = {f"probe {j}: net influence": net[:, j].tolist() for j in range(net.shape[1])}
    save(summary_curves(rounds, series), str(out / "behaviour_influence.png"))
    return (
        "<p>For each probe (state, action): log pi(a|s) at the start of each round, and the summed "
        "action-target scores of that round's records (positive: the round's data pushes the "
        "action up).</p><img src='behaviour_logp.png'><img src='behaviour_influence.png'>"
    )


def _value(summary: dict, key: str) -> float:
    value = summary_value(summary, key)
    return float(value) if isinstance(value, int | float) else float("nan")


def write_report(
    path: str | Path, out: str | Path | None = None, *, recent: int = 5, top_k: int = 10
) -> Path:
    """Write ``index.html`` and PNGs for the run at ``path``; returns the path of index.html.

    Args:
        path: the run folder (or its ``rlattr`` subfolder). out: output folder (default
            ``{run}/report``). recent: rounds with a top/bottom table. top_k: rows per side.
    """
    run = load_run(path)
    if not run.rounds:
        raise RlattrError(f"path: the run at {str(path)!r} has no scored round yet")
    out_dir = Path(out) if out is not None else run.root.parent / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = run.rounds
    all_scores = [run.scores(r).scores for r in rounds]
    all_scores = [s if s.dim() == 1 else s.mean(0) for s in all_scores]
    by_round = {s["round"]: s for s in run.summaries}
    keys = ("positive_fraction", "score_mean", "score_std", "seconds")
    series = {k: [_value(by_round.get(r, {}), k) for r in rounds] for k in keys}
    save(summary_curves(rounds, series), str(out_dir / "summary.png"))
    save(score_distributions(rounds, all_scores), str(out_dir / "distributions.png"))
    last = rounds[-1]
    save(
        score_vs_advantage(all_scores[-1], run.advantages(last), f"round {last}"),
        str(out_dir / "score_vs_adv.png"),
    )
    tables = "".join(_table(run, k, top_k) for k in rounds[-recent:])
    hp = run.meta.get("hyperparameters", {})
    target = run.meta.get("target", {})
    head = html.escape(
        f"{hp.get('algorithm', '?')} ({hp.get('policy', '?')}), {hp.get('n_steps', '?')} steps x "
        f"{hp.get('n_envs', '?')} envs per round, target: {target.get('name', '?')} "
        f"({', '.join(f'{k}={v}' for k, v in target.items() if k != 'name')})"
    )
    page = (
        f"<html><head><meta charset='utf-8'><title>rlattr report</title><style>{_STYLE}</style></head><body>"
        f"<h1>rlattr report</h1><p>{head}</p><p>{len(rounds)} scored rounds, snapshots use "
        f"{run.disk_bytes / 2**20:.2f} MiB. Positive score: a gradient step on the record raises the "
        "target.</p><h2>Per round</h2><img src='summary.png'><h2>Score distributions</h2>"
        f"<img src='distributions.png'><h2>Score vs advantage (round {last})</h2><img src='score_vs_adv.png'>"
        f"<h2>Behaviour formation</h2>{_behaviour(run, out_dir)}<h2>Top and bottom records</h2>{tables}"
        f"{validity_section(run.root, out_dir)}</body></html>"
    )
    index = out_dir / "index.html"
    index.write_text(page)
    return index


__all__ = ["write_report"]
