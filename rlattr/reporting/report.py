"""``rlattr report RUN``: PNG plots and an index.html from a run's snapshots.

Sections: per-round summary curves (positive fraction, mean, std, seconds, disk), the score
distribution of every round, score against advantage for the last round, the top and bottom
records of recent rounds, and behaviour formation (when the run has probes): for each probed
(state, action), log pi(a|s) at theta(k) and the net influence of each round's records on it.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rlattr.core.store import atomic_write_bytes
from rlattr.errors import RlattrError, check_int
from rlattr.reporting.plots import save, score_distributions, score_vs_advantage, summary_curves
from rlattr.reporting.rlhf import write_rlhf_report
from rlattr.reporting.summary import html_table, summary_value, top_bottom
from rlattr.reporting.tensorboard import RECORD_HEADER, record_rows
from rlattr.reporting.validity import validity_section
from rlattr.rl.pair_runs import PairRun
from rlattr.rl.records import format_id
from rlattr.rl.snapshots import AttributionRun, load_run

_STYLE = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
_STYLE += "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}"


def _mean_scores(tensors: dict[str, Tensor]) -> Tensor:
    s = tensors["scores"]
    return s if s.dim() == 1 else s.mean(0)


def _readable(run: AttributionRun) -> tuple[dict[int, dict[str, Tensor]], list[int]]:
    """The score tensors of every round that reads back whole, and the rounds that do not."""
    readable, broken = {}, []
    for k in run.rounds:
        try:
            tensors = run.score_tensors(k)
            if not {"scores", "ids", "advantages"} <= set(tensors):
                raise RlattrError(f"round: the scores file of round {k} lacks scores, ids or advantages")
        except RlattrError as err:
            warnings.warn(f"round {k}: skipped in the report ({err})", UserWarning, stacklevel=3)
            broken.append(k)
            continue
        readable[k] = tensors
    return readable, broken


def _table(run: AttributionRun, k: int, tensors: dict[str, Tensor], top_k: int) -> str:
    s = _mean_scores(tensors)
    try:
        records = run.records(k) if run.has_snapshot(k) else None
    except RlattrError:  # a damaged snapshot: the scores file still gives ids and advantages
        records = None
    rows = record_rows(records, s, top_k, advantages=tensors["advantages"])
    if records is None:  # ids still come from the scores file
        for row, (_, _, j) in zip(rows, top_bottom(s, top_k), strict=True):
            row[1] = format_id(tensors["ids"][j])
    return f"<h3>round {int(k)}</h3>{html_table(RECORD_HEADER, rows)}"


def _behaviour(readable: dict[int, dict[str, Tensor]], out: Path) -> str:
    rounds = [r for r, t in readable.items() if "probe_scores" in t and "probe_logp" in t]
    if not rounds:
        return "<p>No probes in this run (pass <code>probe_states=m</code> to InfluenceCallback).</p>"
    logp = torch.stack([readable[r]["probe_logp"] for r in rounds])  # [R, m]
    net = torch.stack([readable[r]["probe_scores"].sum(1) for r in rounds])  # [R, m]
    series = {f"probe {j}: log pi(a|s)": logp[:, j].tolist() for j in range(logp.shape[1])}
    save(summary_curves(rounds, series), str(out / "behaviour_logp.png"))
    series = {f"probe {j}: net influence": net[:, j].tolist() for j in range(net.shape[1])}
    save(summary_curves(rounds, series), str(out / "behaviour_influence.png"))
    return (
        "<p>For each probe (state, action): log pi(a|s) at the start of each round, and the summed "
        "action-target scores of that round's records (positive: the round's data pushes the "
        "action up).</p><img src='behaviour_logp.png'><img src='behaviour_influence.png'>"
    )


def _unreadable(broken: list[int]) -> str:
    if not broken:
        return ""
    return f"<p><b>unreadable rounds (skipped): {', '.join(str(int(k)) for k in broken)}</b></p>"


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
    check_int("recent", recent)
    check_int("top_k", top_k)
    run = load_run(path)
    if not run.rounds:
        raise RlattrError(f"path: the run at {str(path)!r} has no scored round yet")
    readable, broken = _readable(run)
    if not readable:
        raise RlattrError(
            f"path: the run at {str(path)!r} has no readable scored round (unreadable: {broken})"
        )
    out_dir = Path(out) if out is not None else run.root.parent / "report"
    try:
        if isinstance(run, PairRun):  # an RLHF run written by the TRL hook: a page of its own
            return write_rlhf_report(run, list(readable), broken, out_dir, recent=recent, top_k=top_k)
        return _write_page(run, readable, broken, out_dir, recent, top_k)
    except OSError as err:
        raise RlattrError(
            f"out: cannot write the report into {str(out_dir)!r} ({err.strerror or err}); "
            "pass --out to a writable folder"
        ) from err


def _write_page(
    run: AttributionRun,
    readable: dict[int, dict[str, Tensor]],
    broken: list[int],
    out_dir: Path,
    recent: int,
    top_k: int,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = list(readable)
    all_scores = [_mean_scores(t) for t in readable.values()]
    by_round = {s.get("round"): s for s in run.summaries}
    keys = ("positive_fraction", "score_mean", "score_std", "seconds")
    series = {k: [_value(by_round.get(r, {}), k) for r in rounds] for k in keys}
    save(summary_curves(rounds, series), str(out_dir / "summary.png"))
    save(score_distributions(rounds, all_scores), str(out_dir / "distributions.png"))
    last = rounds[-1]
    save(
        score_vs_advantage(all_scores[-1], readable[last]["advantages"], f"round {last}"),
        str(out_dir / "score_vs_adv.png"),
    )
    tables = "".join(_table(run, k, readable[k], top_k) for k in rounds[-recent:])
    hp = run.meta.get("hyperparameters", {})
    target = run.meta.get("target", {})
    head = html.escape(
        f"{hp.get('algorithm', '?')} ({hp.get('policy', '?')}), {hp.get('n_steps', '?')} steps x "
        f"{hp.get('n_envs', '?')} envs per round, target: {target.get('name', '?')} "
        f"({', '.join(f'{k}={v}' for k, v in target.items() if k != 'name')})"
    )
    page = (
        f"<html><head><meta charset='utf-8'><title>rlattr report</title><style>{_STYLE}</style></head><body>"
        f"<h1>rlattr report</h1><p>{head}</p>{_unreadable(broken)}<p>{len(rounds)} scored rounds, snapshots use "
        f"{run.disk_bytes / 2**20:.2f} MiB. Positive score: a gradient step on the record raises the "
        "target.</p><h2>Per round</h2><img src='summary.png'><h2>Score distributions</h2>"
        f"<img src='distributions.png'><h2>Score vs advantage (round {last})</h2><img src='score_vs_adv.png'>"
        f"<h2>Behaviour formation</h2>{_behaviour(readable, out_dir)}<h2>Top and bottom records</h2>{tables}"
        f"{validity_section(run.root, out_dir)}</body></html>"
    )
    index = out_dir / "index.html"
    atomic_write_bytes(index, page.encode())
    return index


__all__ = ["write_report"]
