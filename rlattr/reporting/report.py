"""``rlattr report RUN``: PNG plots and an index.html from a run's snapshots.

Sections: how to read the page and the run itself (seed, settings, config; see
:mod:`rlattr.reporting.run_sections`), per-round summary curves (the mean episode return SB3 logged,
positive fraction, mean, std, seconds), the score distribution of every round, score against
advantage for the last round, behaviour formation (when the run has probes): for each probed
(state, action), log pi(a|s) at theta(k) and the net influence of each round's records on it, an IIF
section for runs made by IIFCallback, and the top and bottom records of recent rounds.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rlattr.core.store import atomic_write_bytes
from rlattr.errors import RlattrError, check_int
from rlattr.progress import progress_bar
from rlattr.reporting.plots import save, score_distributions, score_vs_advantage, summary_curves
from rlattr.reporting.rlhf import write_rlhf_report
from rlattr.reporting.run_sections import (
    explanation_html,
    iif_section,
    probe_labels,
    returns_for_rounds,
    run_section,
)
from rlattr.reporting.summary import html_table, summary_value, top_bottom
from rlattr.reporting.tensorboard import RECORD_HEADER, record_rows
from rlattr.reporting.validity import validity_section
from rlattr.rl.pair_runs import PairRun
from rlattr.rl.records import format_id
from rlattr.rl.snapshots import AttributionRun, load_run

_STYLE = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
_STYLE += "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}"
# summary key -> panel title, and each panel's y-label
_SUMMARY_PANELS = {
    "positive_fraction": "positive fraction",
    "score_mean": "mean score",
    "score_std": "score std",
    "seconds": "attribution seconds",
}
_SUMMARY_YLABELS = {
    "return": "mean episode return",
    "positive fraction": "fraction of records with score > 0",
    "mean score": "mean influence score",
    "score std": "std of influence scores",
    "attribution seconds": "seconds per round",
}


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
    names = probe_labels(readable) or [f"probe {j}" for j in range(logp.shape[1])]
    short = [n.split(":")[0] for n in names]
    series = {short[j]: logp[:, j].tolist() for j in range(logp.shape[1])}
    save(summary_curves(rounds, series, dict.fromkeys(short, "log pi(a|s)")), str(out / "behaviour_logp.png"))
    series = {short[j]: net[:, j].tolist() for j in range(net.shape[1])}
    ylabel = dict.fromkeys(short, "net influence (sum of scores)")
    save(summary_curves(rounds, series, ylabel), str(out / "behaviour_influence.png"))
    items = "".join(f"<li>{html.escape(n)}</li>" for n in names)
    return (
        f"<p>The probes (state s, action a):</p><ul>{items}</ul><p>For each probe: log pi(a|s) at the "
        "start of each round, and the summed action-target scores of that round's records (positive: the "
        "round's data pushes the action up).</p><img src='behaviour_logp.png' alt='probe log-probabilities'>"
        "<img src='behaviour_influence.png' alt='probe net influence'>"
    )


def _unreadable(broken: list[int]) -> str:
    if not broken:
        return ""
    return f"<p><b>unreadable rounds (skipped): {', '.join(str(int(k)) for k in broken)}</b></p>"


def _value(summary: dict, key: str) -> float:
    value = summary_value(summary, key)
    return float(value) if isinstance(value, int | float) else float("nan")


def write_report(
    path: str | Path,
    out: str | Path | None = None,
    *,
    recent: int = 5,
    top_k: int = 10,
    progress: bool | None = None,
) -> Path:
    """Write ``index.html`` and PNGs for the run at ``path``; returns the path of index.html.

    Args:
        path: the run folder (or its ``rlattr`` subfolder). out: output folder (default
            ``{run}/report``). recent: rounds with a top/bottom table. top_k: rows per side.
        progress: a progress bar (``None``: when the console is a terminal).
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
        return _write_page(run, readable, broken, out_dir, recent, top_k, progress)
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
    progress: bool | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = list(readable)
    all_scores = [_mean_scores(t) for t in readable.values()]
    by_round = {s.get("round"): s for s in run.summaries}
    series = {label: [_value(by_round.get(r, {}), k) for r in rounds] for k, label in _SUMMARY_PANELS.items()}
    returns = returns_for_rounds(run, rounds)
    if returns is not None:  # the return curve first, beside the attribution summaries
        series = {"return": returns, **series}
    last = rounds[-1]
    hp = run.meta.get("hyperparameters", {})
    target = run.meta.get("target", {})
    with progress_bar("rlattr report", 6 + len(rounds[-recent:]), progress) as advance:
        save(summary_curves(rounds, series, _SUMMARY_YLABELS), str(out_dir / "summary.png"))
        advance(note="summaries")
        save(score_distributions(rounds, all_scores), str(out_dir / "distributions.png"))
        advance(note="distributions")
        save(
            score_vs_advantage(all_scores[-1], readable[last]["advantages"], f"round {last}"),
            str(out_dir / "score_vs_adv.png"),
        )
        advance(note="score vs advantage")
        tables = ""
        for k in rounds[-recent:]:
            tables += _table(run, k, readable[k], top_k)
            advance(note=f"table of round {k}")
        the_run = run_section(run, returns is not None)
        advance(note="run settings")
        behaviour = _behaviour(readable, out_dir)
        iif = iif_section(run, readable, out_dir)
        advance(note="behaviour and IIF")
        validity = validity_section(run.root, out_dir)
        advance(note="validity")
    head = html.escape(
        f"{hp.get('algorithm', '?')} ({hp.get('policy', '?')}), {hp.get('n_steps', '?')} steps x "
        f"{hp.get('n_envs', '?')} envs per round, target: {target.get('name', '?')} "
        f"({', '.join(f'{k}={v}' for k, v in target.items() if k != 'name')})"
    )
    page = (
        f"<html><head><meta charset='utf-8'><title>rlattr report</title><style>{_STYLE}</style></head><body>"
        f"<h1>rlattr report</h1><p>{head}</p>{_unreadable(broken)}<p>{len(rounds)} scored rounds, snapshots use "
        f"{run.disk_bytes / 2**20:.2f} MiB. Positive score: a gradient step on the record raises the "
        f"target.</p>{explanation_html(target)}{the_run}<h2>Per round</h2>"
        "<img src='summary.png' alt='per-round summaries'><h2>Score distributions</h2>"
        "<img src='distributions.png' alt='score distribution per round'>"
        f"<h2>Score vs advantage (round {last})</h2><img src='score_vs_adv.png' alt='score vs advantage'>"
        f"<h2>Behaviour formation</h2>{behaviour}{iif}<h2>Top and bottom records</h2>{tables}"
        f"{validity}</body></html>"
    )
    index = out_dir / "index.html"
    atomic_write_bytes(index, page.encode())
    return index


__all__ = ["write_report"]
