"""The report page of an RLHF run (written by the TRL hook; read with :class:`rlattr.rl.pair_runs.PairRun`).

Sections: per-generation-batch curves (kept fraction, target reward, score mean, positive fraction),
the score distribution of every batch, score against advantage for the last batch, and the top and
bottom completions of recent batches. Every text from the run folder is HTML-escaped: a received run
is untrusted.
"""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path

from rlattr.core.store import atomic_write_bytes
from rlattr.errors import RlattrError
from rlattr.reporting.plots import save, score_distributions, score_vs_advantage, summary_curves
from rlattr.reporting.summary import html_table, top_bottom
from rlattr.rl.pair_runs import PairBatch, PairRun, format_pair_id

_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;vertical-align:top}img{max-width:100%}"
)
_HEADER = ("end", "rank", "pair", "score", "advantage", "kept", "prompt", "completion")
_CURVES = ("kept_fraction", "target_reward", "score_mean", "positive_fraction")


def _number(summary: dict, key: str) -> float:
    value = summary.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _table(batch: PairBatch, top_k: int) -> str:
    rows = [
        [
            end,
            rank,
            format_pair_id(batch.ids[i]),
            f"{float(batch.scores[i]):.4g}",
            f"{float(batch.advantages[i]):.3g}",
            "yes" if bool(batch.keep[i]) else "dropped",
            batch.prompts[i],
            batch.completions[i],
        ]
        for end, rank, i in top_bottom(batch.scores, top_k)
    ]
    kept = float(batch.keep.float().mean()) if batch.keep.numel() else math.nan
    head = f"generation batch {batch.round} (step {batch.global_step}, kept {kept:.0%})"
    note = f"<p>{html.escape(batch.note)}</p>" if batch.note else ""
    return f"<h3>{html.escape(head)}</h3>{note}{html_table(_HEADER, rows)}"


def _headline(run: PairRun) -> str:
    hp = run.meta.get("hyperparameters", {})
    hp = hp if isinstance(hp, dict) else {}
    settings = run.meta.get("attribution", {})
    settings = settings if isinstance(settings, dict) else {}
    targets = settings.get("target_prompts", [])
    n_targets = len(targets) if isinstance(targets, list) else "?"
    text = (
        f"{run.meta.get('trainer', '?')}: {hp.get('algorithm', '?')} (loss_type {hp.get('loss_type', '?')}), "
        f"{hp.get('group_size', '?')} completions per prompt, f_seq over {n_targets} held-out prompts, "
        f"{'IIF (drops pairs)' if settings.get('drop') else 'score only'}"
    )
    return html.escape(text)


def _batches(run: PairRun, rounds: list[int], broken: list[int]) -> dict[int, PairBatch]:
    """The batches that read back whole; the others are added to ``broken`` with a warning."""
    out = {}
    for k in rounds:
        try:
            out[k] = run.batch(k)
        except RlattrError as err:
            warnings.warn(f"round {k}: skipped in the report ({err})", UserWarning, stacklevel=3)
            broken.append(k)
    return out


def write_rlhf_report(
    run: PairRun, rounds: list[int], broken: list[int], out_dir: Path, *, recent: int = 5, top_k: int = 10
) -> Path:
    """Write ``index.html`` and its PNGs for an RLHF run into ``out_dir``; returns the page's path.

    ``rounds``: the generation batches to show; ``broken``: those that could not be read (named on the page).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    broken = list(broken)
    batches = _batches(run, rounds, broken)
    if not batches:
        raise RlattrError(f"path: the run at {str(run.root)!r} has no readable generation batch")
    rounds = list(batches)
    by_round = {s.get("round"): s for s in run.summaries if isinstance(s, dict)}
    series = {key: [_number(by_round.get(k, {}), key) for k in rounds] for key in _CURVES}
    save(summary_curves(rounds, series), str(out_dir / "summary.png"))
    save(score_distributions(rounds, [batches[k].scores for k in rounds]), str(out_dir / "distributions.png"))
    last = batches[rounds[-1]]
    title = f"generation batch {last.round}"
    save(score_vs_advantage(last.scores, last.advantages, title), str(out_dir / "score_vs_adv.png"))
    unreadable = f"<p>Unreadable generation batches (skipped): {html.escape(str(sorted(broken)))}</p>"
    tables = "".join(_table(batches[k], top_k) for k in rounds[-recent:]) if recent > 0 else ""
    page = (
        f"<html><head><meta charset='utf-8'><title>rlattr report (RLHF)</title><style>{_STYLE}</style>"
        f"</head><body><h1>rlattr report: RLHF run</h1><p>{_headline(run)}</p><p>{len(rounds)} scored "
        f"generation batches, {run.disk_bytes / 2**20:.2f} MiB on disk. A pair's score is the dot product of "
        "grad f_seq (the held-out prompts' advantage-weighted log-probability) with minus the gradient of its "
        "share of TRL's loss: positive means training on the pair raises f_seq. Pair ids read "
        "b(generation batch)/g(prompt group)/c(completion in the group).</p>"
        f"{unreadable if broken else ''}"
        "<h2>Per generation batch</h2><img src='summary.png' alt='kept fraction, target reward, score mean, "
        "positive fraction per batch'><h2>Score distributions</h2><img src='distributions.png' "
        f"alt='score distribution per batch'><h2>Score vs advantage ({html.escape(title)})</h2>"
        "<img src='score_vs_adv.png' alt='score against advantage'>"
        f"<h2>Top and bottom completions</h2>{tables}</body></html>"
    )
    index = out_dir / "index.html"
    atomic_write_bytes(index, page.encode())
    return index


__all__ = ["write_rlhf_report"]
