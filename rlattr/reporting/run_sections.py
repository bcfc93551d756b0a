"""The parts of the HTML report that explain the scores and show the run they came from.

``explanation_html``: what a score is, what its sign means, how a record id reads, and why the most
helpful records can have negative advantages. ``run_section``: the return curve SB3 logged
(``rollout/ep_rew_mean``) beside the rounds, the seed and the config. ``iif_section`` (runs made by
IIFCallback): kept fraction per round and the score and advantage distributions of the dropped
records against the kept ones. ``probe_labels`` names each behaviour probe by its state and action.

Everything read here comes from a run folder that may have been received from someone else: JSON is
type-checked, text is escaped, and file names are fixed strings.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlattr.core.store import load_json
from rlattr.errors import StoreError
from rlattr.reporting.plots import dropped_vs_kept, save, summary_curves
from rlattr.reporting.tensorboard import state_summary
from rlattr.rl.records import unflatten_observations
from rlattr.rl.snapshots import AttributionRun

RETURN_TAG = "rollout/ep_rew_mean"

EXPLANATION = """
<h2>How to read this page</h2>
<ul>
<li><strong>Score.</strong> Each record is one transition (state, action, advantage) of a PPO round's rollout
buffer. Its score is the first-order effect of training on that record alone: the dot product of the
gradient of the record's PPO loss term (with the round's own advantage normalisation and clipping)
with the gradient of the target at the round's starting parameters theta(k). Scores of one round
add up: the sum over a set of records approximates what that set does to the target.</li>
<li><strong>Sign.</strong> Positive: a gradient step on the record <i>raises</i> the target ({target});
the record helps. Negative: it lowers the target; the record hurts. IIF drops the most negative.</li>
<li><strong>Ids.</strong> <code>r5/s1777/e0</code> is round 5 (the sixth rollout), rollout step 1777 of that
round's buffer, environment 0 of the vectorised env. Ids are stable: the same id names the same
record in the TensorBoard tables, the snapshots (<code>rlattr.load_run</code>) and this page.</li>
<li><strong>Helpful records with negative advantages.</strong> A record with a negative advantage teaches the
policy to take its action <i>less</i> often in its state. If the round's other records say that
action is a poor one in similar states, the target's gradient also wants it less often: the record
agrees with the target and scores positive, however negative its advantage. The score measures that
agreement (the record's training push against the direction that raises the target), not whether the
record was a good outcome, so both signs of advantage appear among the most helpful and the most
harmful records. The table shows raw GAE advantages; PPO's loss uses them normalised (minus the
mean), so a small positive raw advantage can still push its action down.</li>
</ul>
"""


def explanation_html(target: dict[str, Any]) -> str:
    """The "how to read this page" section, naming the run's target."""
    name = str(target.get("name", "the target"))
    what = {
        "return": "the expected return (its policy-gradient estimate: mean of log pi(a|s) times the raw advantage over the round's buffer)",
        "action": "log pi(a|s) of the chosen (state, action) pairs",
    }.get(name, name)
    return EXPLANATION.replace("{target}", html.escape(what))


def read_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one scalar tag from the TensorBoard event files of ``run_dir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: dict[int, float] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.tag != tag:
                        continue
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        points[int(event.step)] = float(value.simple_value)
                    elif kind == "tensor" and value.tensor.float_val:
                        points[int(event.step)] = float(value.tensor.float_val[0])
        except Exception:  # noqa: BLE001 - a truncated or foreign event file: use what was read
            continue
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def return_by_round(run: AttributionRun) -> tuple[list[float], list[float]]:
    """``(rounds, mean episode return)``: SB3 logs ``rollout/ep_rew_mean`` after each rollout, at
    ``num_timesteps = (k + 1) * n_steps * n_envs`` for round k (before that round's update)."""
    hp = run.meta.get("hyperparameters", {})
    hp = hp if isinstance(hp, dict) else {}
    n_steps, n_envs = _int(hp.get("n_steps")), _int(hp.get("n_envs"))
    steps, values = read_scalars(run.root.parent, RETURN_TAG)
    if not steps or n_steps is None or n_envs is None:
        return [], []
    per_round = n_steps * n_envs
    return [s / per_round - 1 for s in steps], values


def _settings_html(run: AttributionRun) -> str:
    run_dir = run.root.parent
    rows: list[tuple[str, str]] = []
    info = _json_dict(run_dir / "run_info.json")
    hp = run.meta.get("hyperparameters", {})
    seed = info.get("seed", hp.get("seed") if isinstance(hp, dict) else None)
    if isinstance(hp, dict):
        rows += [(str(k), str(v)) for k, v in hp.items()]
    versions = run.meta.get("versions", {})
    if isinstance(versions, dict):
        for key in ("rlattr", "git_commit", "workdir_git_commit", "command"):
            if versions.get(key) is not None:
                rows.append((key, str(versions[key])))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    config = run_dir / "config.yaml"
    # a received run folder is untrusted: a link could point anywhere on this machine
    text = config.read_text(errors="replace")[:20_000] if config.is_file() and not config.is_symlink() else ""
    seed_text = html.escape(str(seed)) if seed is not None else "not recorded (set PPO's seed)"
    out = f"<p>seed: <strong>{seed_text}</strong></p><details><summary>PPO settings and versions</summary>"
    out += f"<table>{table}</table></details>"
    if text:
        out += f"<details><summary>config.yaml</summary><pre>{html.escape(text)}</pre></details>"
    return out


def _json_dict(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        return {}
    try:
        data = load_json(path)
    except (StoreError, OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def returns_for_rounds(run: AttributionRun, rounds: list[int]) -> list[float] | None:
    """The mean episode return at each of ``rounds`` (NaN where SB3 logged none); None without any."""
    logged, values = return_by_round(run)
    if not logged:
        return None
    by_round = {round(r): v for r, v in zip(logged, values, strict=True)}
    return [by_round.get(int(k), math.nan) for k in rounds]


def run_section(run: AttributionRun, has_return: bool) -> str:
    """Seed, settings and config of the run, and where its return curve is."""
    if has_return:
        curve = (
            "<p>The first panel under <i>Per round</i> is the mean episode return of the rollouts (SB3's "
            "<code>rollout/ep_rew_mean</code>: the last 100 episodes finished by the end of each round's "
            "rollout, before that round's update), beside the attribution summaries of the same rounds.</p>"
        )
    else:
        curve = "<p>No return curve: SB3's TensorBoard events (rollout/ep_rew_mean) are not in the run folder.</p>"
    return f"<h2>The run</h2>{curve}{_settings_html(run)}"


def probe_labels(readable: dict[int, dict[str, Tensor]]) -> list[str]:
    """``"probe j: a=ACTION at s=STATE"`` for each probe, from the probes stored with the first round."""
    for tensors in readable.values():
        obs = unflatten_observations("probe_observations", tensors)
        actions = tensors.get("probe_actions")
        if obs is None or actions is None:
            continue
        labels = []
        for j in range(actions.shape[0]):
            o = {k: v[j] for k, v in obs.items()} if isinstance(obs, dict) else obs[j]
            act = ", ".join(f"{float(a):.3g}" for a in actions[j].reshape(-1)[:4])
            labels.append(f"probe {j}: a={act} at s={state_summary(o)}")
        return labels
    return []


def _dropped_rounds(run: AttributionRun) -> dict[int, list[list[int]]]:
    """Dropped ids per round from ``rlattr/iif/round_XXXXX.json`` (type-checked; bad files skipped)."""
    out = {}
    for k in run.rounds:
        data = _json_dict(run.root / "iif" / f"round_{int(k):05d}.json")
        ids = data.get("dropped_ids")
        if isinstance(ids, list) and all(
            isinstance(i, list) and len(i) == 3 and all(isinstance(x, int) for x in i) for i in ids
        ):
            out[int(k)] = ids
    return out


def is_iif_run(run: AttributionRun) -> bool:
    callback = run.meta.get("callback", {})
    return isinstance(callback, dict) and "iif_rule" in callback


def _kept_masks(
    readable: dict[int, dict[str, Tensor]], dropped: dict[int, list[list[int]]]
) -> dict[int, Tensor]:
    """``bool Tensor[n]`` per round: True where the stored record id is not among the dropped ids."""
    masks = {}
    for k, ids in dropped.items():
        if k not in readable:
            continue
        gone = {tuple(i) for i in ids}
        stored = readable[k]["ids"].long().tolist()  # [n, 3]
        masks[k] = torch.tensor([tuple(i) not in gone for i in stored], dtype=torch.bool)
    return masks


def iif_section(run: AttributionRun, readable: dict[int, dict[str, Tensor]], out_dir: Path) -> str:
    """Kept fraction per round and dropped-vs-kept distributions, for runs made by IIFCallback."""
    if not is_iif_run(run):
        return ""
    rule = html.escape(json.dumps(run.meta["callback"].get("iif_rule"), default=str)[:500])
    masks = _kept_masks(readable, _dropped_rounds(run))
    if not masks:
        return f"<h2>IIF</h2><p>rule {rule}; no dropped-id files (save_dropped=False?)</p>"
    rounds = sorted(masks)
    kept = [float(masks[k].double().mean()) for k in rounds]
    save(summary_curves(rounds, {"kept fraction": kept}), str(out_dir / "iif_kept.png"))
    scores = torch.cat([_mean(readable[k]["scores"]) for k in rounds])
    advantages = torch.cat([readable[k]["advantages"].reshape(-1).float() for k in rounds])
    keep = torch.cat([masks[k] for k in rounds])
    save(dropped_vs_kept(scores, advantages, keep), str(out_dir / "iif_dropped.png"))
    n_drop = int((~keep).sum())
    mean_kept = sum(kept) / len(kept) if kept else math.nan
    return (
        f"<h2>IIF: what was dropped</h2><p>Rule {rule}. Over {len(rounds)} rounds {n_drop} records were "
        f"dropped before PPO's update (mean kept fraction {mean_kept:.3f}); PPO trained on the kept "
        "records only. The return curve of this run is the first panel under <i>Per round</i>.</p>"
        "<img src='iif_kept.png' alt='kept fraction per round'>"
        "<img src='iif_dropped.png' alt='dropped vs kept distributions'>"
    )


def _mean(scores: Tensor) -> Tensor:
    return (scores if scores.dim() == 1 else scores.mean(0)).float()


__all__ = [
    "explanation_html",
    "iif_section",
    "is_iif_run",
    "probe_labels",
    "read_scalars",
    "return_by_round",
    "returns_for_rounds",
    "run_section",
]
