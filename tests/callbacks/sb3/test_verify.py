"""``rlattr verify RUN --round K`` end to end on a tiny CartPole run trained by ``rlattr train``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rlattr.callbacks.sb3.verify import round_context
from rlattr.cli import main
from rlattr.eval.rl_validity import retrain_subset
from rlattr.eval.verify import Transcript, spot_checks_needed
from rlattr.rl.replay import max_abs_diff, replay_round

TINY = {
    "env_id": "CartPole-v1",
    "exp_name": "v",
    "seed": 2,
    "total_timesteps": 64,
    "ppo": {
        "n_steps": 32,
        "batch_size": 16,
        "n_epochs": 2,
        "learning_rate": 0.01,
        "policy_kwargs": {"net_arch": [8], "optimizer_class": "SGD"},
    },
    "callback": {"probe_states": 2, "snapshot_every": 1},
    "torch_threads": 1,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("verify")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--runs-dir", str(tmp / "runs"), "--no-progress"]) == 0
    (run,) = list((tmp / "runs").iterdir())
    return run


def test_verify_writes_a_transcript_whose_answers_are_retrainings(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    argv = ["verify", str(run_dir), "--round", "1", "--epsilon", "0.3", "--delta", "0.1"]
    rc = main([*argv, "--seed", "0", "--queries", "30", "--calibration", "6", "--out", str(out)])
    t = Transcript.load(out)
    assert rc == (0 if t.accepted else 1)
    assert t.n_retrainings == spot_checks_needed(0.3, 0.1) == len(t.spot_checked)
    assert t.spot_values == [t.answers[j] for j in t.spot_checked]  # honest answers pass exactly
    assert t.meta["round"] == 1 and "exact" in t.meta["optimizer"]
    # an answer equals the round re-run by hand on that subset; all records = an SGD replay
    ctx, scores, _ = round_context(run_dir, 1)
    assert scores.shape == (32,)
    mask = t.masks()[0]
    theta = retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, mask, 0)
    assert float(ctx.target_value(theta)[0]) == pytest.approx(t.answers[0], rel=1e-9, abs=1e-12)
    full = replay_round(ctx.model, ctx.policy_eval, ctx.snapshot).theta
    assert (
        max_abs_diff(
            full,
            retrain_subset(ctx.model, ctx.policy_eval, ctx.snapshot, torch.ones(32, dtype=torch.bool), 0),
        )
        == 0.0
    )


def test_verify_errors_are_one_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(run_dir), "--round", "1", "--epsilon", "2"])
    assert exc.value.code == 2
    assert "epsilon: got 2.0; supported: a number in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", str(run_dir), "--round", "9"])
    assert "round: 9 was not scored in this run" in capsys.readouterr().err
