"""Validity figures of RL attribution scores: local-LDS plots, a Markdown table and a report section.

Input: a validity document in the format :mod:`rlattr.eval.schema` owns (built there by
``experiments/rl_attribution_validity.py``, checked there by every function here).

A run shows its validity figures in ``rlattr report`` when such a document sits at
``{run}/rlattr/validity.json`` (or ``{run}/validity.json``): see :func:`validity_section`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from rlattr.errors import RlattrError
from rlattr.eval.schema import check_validity, load_validity
from rlattr.reporting.plots import plt, save

VALIDITY_FILES = ("rlattr/validity.json", "validity.json")


def plot_validity(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One PNG per target (``validity_lds_{target}.png``): LDS per scorer and stage, one panel per
    environment, 95% bootstrap intervals as error bars; the noise ceiling as a dashed tick."""
    stages = check_validity(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    envs = list(dict.fromkeys(s["env"] for s in stages))
    paths = []
    for target in stages[0]["lds"]:
        fig, axes = plt.subplots(1, len(envs), figsize=(4.6 * len(envs), 3.6), dpi=90, squeeze=False)
        for ax, env in zip(axes[0], envs, strict=True):
            rows = [s for s in stages if s["env"] == env]
            scorers = list(rows[0]["lds"][target])
            width = 0.8 / len(scorers)
            for j, name in enumerate(scorers):
                vals = [r["lds"][target][name] for r in rows]
                x = np.arange(len(rows)) + (j - (len(scorers) - 1) / 2) * width
                y = np.array([v["lds"] for v in vals])
                err = np.array([[v["lds"] - v["lo"] for v in vals], [v["hi"] - v["lds"] for v in vals]])
                ax.bar(x, y, width, yerr=err, capsize=2, label=name)
            for i, r in enumerate(rows):
                ax.hlines(r["ceiling"][target], i - 0.45, i + 0.45, colors="k", linestyles="dashed", lw=0.8)
            ax.axhline(0.3, color="red", lw=0.6)
            ax.set_xticks(range(len(rows)), [f"{r['stage']}\n(round {r['round']})" for r in rows])
            ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.05)
            ax.set_title(env)
            ax.set_ylabel(f"local LDS ({target} target)")
        axes[0][0].legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = out / f"validity_lds_{target}.png"
        save(fig, str(path))
        paths.append(path)
    return paths


def _fmt(v: dict[str, float]) -> str:
    return f"{v['lds']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]"


def validity_table(results: dict[str, Any], target: str = "buffer") -> str:
    """Markdown table: one row per (env, stage), LDS [95% CI] per scorer, the noise ceiling."""
    stages = check_validity(results)
    if target not in stages[0]["lds"]:
        raise RlattrError(f"target: got {target!r}; the document has {sorted(stages[0]['lds'])}")
    scorers = list(stages[0]["lds"][target])
    head = "| env | stage (round) | rollout return | " + " | ".join(scorers) + " | ceiling |"
    lines = [head, "|" + "---|" * (len(scorers) + 4)]
    for s in stages:
        cells = [_fmt(s["lds"][target][k]) for k in scorers]
        ret = s.get("rollout_return", float("nan"))
        lines.append(
            f"| {s['env']} | {s['stage']} ({s['round']}) | {ret:.1f} | "
            + " | ".join(cells)
            + f" | {s['ceiling'][target]:.2f} |"
        )
    return "\n".join(lines)


def intervention_table(results: dict[str, Any]) -> str:
    """Markdown table of the intervention: change of evaluation return and of the two targets after
    dropping IIF's bottom records vs as many random records, against the full re-run."""
    lines = [
        "| env | stage (round) | dropped | full return | delta return: bottom / random | "
        "delta buffer target: bottom / random | delta validation target: bottom / random |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in check_validity(results):
        iv = s["intervention"]
        b, r = iv["delta_bottom"], iv["delta_random"]
        lines.append(
            f"| {s['env']} | {s['stage']} ({s['round']}) | {iv['n_dropped']} | {iv['full']['return']:.1f} | "
            f"{b['return']:+.1f} / {r['return']:+.1f} | {b['buffer']:+.2e} / {r['buffer']:+.2e} | "
            f"{b['validation']:+.2e} / {r['validation']:+.2e} |"
        )
    return "\n".join(lines)


def find_validity(run_dir: str | Path) -> Path | None:
    """The validity document of a run folder (or its ``rlattr`` subfolder), if there is one."""
    p = Path(run_dir)
    for base in (p, p.parent):
        for name in VALIDITY_FILES:
            if (base / name).is_file():
                return base / name
    return None


def validity_section(run_dir: str | Path, out_dir: str | Path) -> str:
    """HTML for ``rlattr report``: LDS plots and tables when the run has validity figures, else ""."""
    path = find_validity(run_dir)
    if path is None:
        return ""
    # a received run's document is untrusted: any fault in it is named on the page, not raised
    try:
        results = load_validity(path)
        images = "".join(f"<img src='{html.escape(p.name)}'>" for p in plot_validity(results, out_dir))
        tables = "".join(
            f"<h3>local LDS, {html.escape(t)} target</h3><pre>{html.escape(validity_table(results, t))}</pre>"
            for t in check_validity(results)[0]["lds"]
        )
        interventions = html.escape(intervention_table(results))
    except (RlattrError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as err:
        return (
            f"<h2>Validity (local LDS)</h2><p>{html.escape(path.name)} skipped: "
            f"{html.escape(f'{type(err).__name__}: {err}')}</p>"
        )
    return (
        "<h2>Validity (local LDS)</h2><p>Spearman correlation, over random 50% subsets of a round's "
        "buffer, between the summed scores of a subset and the target after re-running the round on "
        f"it (from {html.escape(str(path))}).</p>{images}{tables}"
        f"<h3>intervention</h3><pre>{interventions}</pre>"
    )


__all__ = [
    "check_validity",
    "find_validity",
    "intervention_table",
    "plot_validity",
    "validity_section",
    "validity_table",
]
