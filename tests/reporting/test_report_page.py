"""The report explains itself and shows its run: return curve, seed, named probes, an IIF section.

Numbers are checked against what SB3 itself saw (its episode-info buffer at the end of each
rollout) and what IIFCallback dropped; the page is loaded in a real headless browser when one is
installed (Debian's ``chromium``): no console error, and every image resolves.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from matplotlib import pyplot as plt
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from rlattr.callbacks.sb3.iif import IIFCallback
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.reporting.plots import summary_curves
from rlattr.reporting.report import write_report
from rlattr.reporting.run_sections import probe_labels, return_by_round
from rlattr.reporting.tensorboard import state_summary
from rlattr.rl.snapshots import load_run

torch.set_num_threads(1)
N_STEPS, ROUNDS = 64, 3


class EpisodeMeans(BaseCallback):
    """SB3's own ``rollout/ep_rew_mean`` input, read at the end of every rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.means: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        rewards = [ep["r"] for ep in self.model.ep_info_buffer or []]
        self.means.append(sum(rewards) / len(rewards) if rewards else math.nan)


def _train(tmp: Path, callback: InfluenceCallback) -> tuple[InfluenceCallback, EpisodeMeans]:
    means = EpisodeMeans()
    model = PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=N_STEPS,
        batch_size=32,
        n_epochs=1,
        seed=3,
        tensorboard_log=str(tmp),
        policy_kwargs={"net_arch": [8]},
    )
    model.learn(N_STEPS * ROUNDS, callback=[callback, means])
    return callback, means


@pytest.fixture(scope="module")
def influence_run(tmp_path_factory) -> tuple[InfluenceCallback, EpisodeMeans]:
    return _train(tmp_path_factory.mktemp("infl"), InfluenceCallback(target="return", probe_states=2))


@pytest.fixture(scope="module")
def iif_run(tmp_path_factory) -> IIFCallback:
    cb, _ = _train(tmp_path_factory.mktemp("iif"), IIFCallback(drop="neg-bottom", p=0.5))
    assert isinstance(cb, IIFCallback)
    return cb


def test_return_curve_is_what_sb3_saw(influence_run) -> None:
    cb, means = influence_run
    rounds, returns = return_by_round(load_run(cb.run_dir))
    finite = [(k, m) for k, m in enumerate(means.means) if not math.isnan(m)]
    assert finite, "CartPole finishes episodes within 64 steps"
    assert [round(r) for r in rounds] == [k for k, _ in finite]
    assert returns == pytest.approx([m for _, m in finite], rel=1e-6)


def test_page_explains_scores_and_shows_the_run(influence_run) -> None:
    cb, _ = influence_run
    page = write_report(cb.run_dir, progress=False).read_text()
    for text in ("How to read this page", "r5/s1777/e0", "negative advantage", "raises</i> the target"):
        assert text in page
    assert "seed: <strong>3</strong>" in page and "rollout/ep_rew_mean" in page


def test_probes_are_named_by_state_and_action(influence_run) -> None:
    cb, _ = influence_run
    run = load_run(cb.run_dir)
    labels = probe_labels({k: run.score_tensors(k) for k in run.rounds})
    records = run.records(0)
    positions = torch.linspace(0, len(records) - 1, 2).long()  # the callback's evenly spaced probes
    assert len(labels) == 2
    for j, pos in enumerate(positions.tolist()):
        action = f"{float(records.actions[pos].reshape(-1)[0]):.3g}"
        assert labels[j] == f"probe {j}: a={action} at s={state_summary(records.observations[pos])}"
    page = write_report(cb.run_dir, progress=False).read_text()
    assert all(label in page for label in labels)


def test_iif_section_matches_what_was_dropped(iif_run) -> None:
    page = write_report(iif_run.run_dir, progress=False).read_text()
    n_dropped = sum(h["n_records"] - h["n_kept"] for h in iif_run.filter_history)
    mean_kept = sum(h["kept_fraction"] for h in iif_run.filter_history) / len(iif_run.filter_history)
    assert n_dropped > 0
    assert f"Over {ROUNDS} rounds {n_dropped} records were dropped" in page
    assert f"mean kept fraction {mean_kept:.3f}" in page
    assert (iif_run.run_dir / "report" / "iif_dropped.png").stat().st_size > 0


def test_no_iif_section_without_iif(influence_run) -> None:
    cb, _ = influence_run
    assert "IIF: what was dropped" not in write_report(cb.run_dir, progress=False).read_text()


def test_every_summary_panel_has_a_y_label() -> None:
    fig = summary_curves([0, 1, 2], {"a": [1, 2, 3], "b": [3, 2, 1]}, {"a": "units of a"})
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_visible()]
    plt.close(fig)
    assert labels == ["units of a", "b"]


CHECK = """<script>
window.addEventListener('load', () => {
  const bad = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
  const out = document.createElement('pre'); out.id = 'rlattr-check';
  out.textContent = 'IMAGES ' + document.images.length + ' BROKEN ' + JSON.stringify(bad);
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM = _chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
@pytest.mark.parametrize("which", ["influence", "iif"])
def test_page_loads_in_a_real_browser(which, influence_run, iif_run, tmp_path) -> None:
    run_dir = influence_run[0].run_dir if which == "influence" else iif_run.run_dir
    index = write_report(run_dir, tmp_path / "report", progress=False)
    probe = index.with_name("browser_check.html")  # the page plus an image check, beside its PNGs
    probe.write_text(index.read_text().replace("</body>", CHECK + "</body>"))
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    cmd += ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    marker = '<pre id="rlattr-check">'
    assert marker in out.stdout, "the page's load handler did not run"
    check = out.stdout[out.stdout.index(marker) + len(marker) :].split("<", 1)[0]
    n_images = len(list(tmp_path.joinpath("report").glob("*.png")))
    assert check.strip() == f"IMAGES {n_images} BROKEN []"
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []


def test_linked_files_of_a_received_run_are_not_read(influence_run, tmp_path) -> None:
    cb, _ = influence_run
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-show-me: 42\n")
    run_dir = tmp_path / "received"
    shutil.copytree(cb.run_dir, run_dir)
    (run_dir / "config.yaml").symlink_to(secret)
    page = write_report(run_dir, progress=False).read_text()
    assert "do-not-show-me" not in page and "How to read this page" in page
