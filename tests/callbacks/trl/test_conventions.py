"""The TRL hook the TRL way: configs from TrlParser, attr/* in TRL's own logs, runs on disk, vLLM.

Offline: a GPT-2 from a tiny config and a character-level tokenizer built in-process; the vLLM
server is replaced by an in-process generator behind TRL's own client interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import TrlParser  # noqa: E402

from rlattr import load_run  # noqa: E402
from rlattr.callbacks.trl import IIFGRPOConfig, IIFGRPOTrainer, IIFRLOOConfig, IIFRLOOTrainer  # noqa: E402
from rlattr.callbacks.trl.config import AttributionConfig  # noqa: E402
from rlattr.errors import ConfigError, RlattrError, RunExistsError  # noqa: E402
from rlattr.reporting.report import write_report  # noqa: E402
from rlattr.reporting.summary import score_summary  # noqa: E402
from rlattr.rl.pair_runs import PairRun  # noqa: E402
from rlattr.testing.tiny_lm import char_tokenizer, tiny_gpt2  # noqa: E402
from tests.callbacks.trl.test_trainer import PROMPTS, TARGET, digits  # noqa: E402

ARGV = [
    "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6",
    "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
    "--save_strategy", "no", "--learning_rate", "1e-2", "--seed", "0", "--bf16", "false",
]  # fmt: skip


def _args(cls: Any, out: Path, *extra: str) -> Any:
    argv = ["--output_dir", str(out), *ARGV, "--attr_target_prompts", *TARGET, *extra]
    if cls is IIFRLOOConfig:  # RLOO's default beta > 0 would load a reference model by hub id
        argv += ["--beta", "0.0"]
    (args,) = TrlParser((cls,)).parse_args_and_config(argv)
    return args


def _trainer(args: Any, cls: type = IIFGRPOTrainer, **kw: Any) -> Any:
    tok = char_tokenizer()
    data = Dataset.from_dict({"prompt": PROMPTS})
    return cls(
        model=tiny_gpt2(tok), reward_funcs=digits, args=args, train_dataset=data, processing_class=tok, **kw
    )


def test_trl_parser_sets_the_attribution_fields(tmp_path: Path) -> None:
    args = _args(
        IIFGRPOConfig, tmp_path, "--attr_drop", "false", "--attr_p", "0.5", "--attr_target_every", "3"
    )
    assert isinstance(args, IIFGRPOConfig) and args.attr_target_prompts == TARGET
    a = args.attribution
    assert isinstance(a, AttributionConfig)
    assert (a.drop, a.selection.config()["p"], a.target_every) == (False, 0.5, 3)
    assert a.target_prompts == [{"prompt": p} for p in TARGET]
    t = _trainer(args)
    assert t.attribution is a
    rloo = _args(IIFRLOOConfig, tmp_path / "rloo", "--attr_min_keep", "4")
    assert isinstance(_trainer(rloo, IIFRLOOTrainer).attribution, AttributionConfig)
    assert rloo.attribution.selection.min_keep == 4
    # every attr_* field has a help string on the command line
    help_text = TrlParser((IIFGRPOConfig,)).format_help()
    for name in (
        "attr_target_prompts",
        "attr_drop",
        "attr_p",
        "attr_min_keep",
        "attr_target_every",
        "attr_save",
    ):
        assert f"--{name}" in help_text
    assert "rlattr attribution hook: held-out prompts" in help_text


def test_bad_attribution_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RlattrError, match=r"target_prompts: got str '1\+2='; supported: a list of prompts"):
        AttributionConfig("1+2=")
    with pytest.raises(ConfigError, match=r"attr_target_prompts: got str '1\+2='"):
        IIFGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, attr_target_prompts="1+2=")  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="drop: got 'no'; supported: True or False"):
        AttributionConfig(TARGET, drop="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="attr_drop: got 0; supported: True or False"):
        IIFGRPOConfig(
            output_dir=str(tmp_path), use_cpu=True, bf16=False, attr_target_prompts=TARGET, attr_drop=0
        )  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match="target_every: got 0; supported: an int >= 1"):
        AttributionConfig(TARGET, target_every=0)
    args = _args(IIFGRPOConfig, tmp_path)
    with pytest.raises(ConfigError, match="attribution: got both"):
        _trainer(args, attribution=AttributionConfig(TARGET))
    args.attribution = None  # a config without target prompts and no attribution= either
    with pytest.raises(TypeError, match="attribution: expected an AttributionConfig, got None"):
        _trainer(args)


def test_attr_scalars_land_in_log_history_on_trl_step_and_nothing_else_is_logged(tmp_path: Path) -> None:
    t = _trainer(_args(IIFGRPOConfig, tmp_path, "--attr_drop", "false"))
    t.train()
    steps = [e for e in t.state.log_history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2] and len(t.attribution_history) == 2
    for entry, rec in zip(steps, t.attribution_history, strict=True):
        s = rec["scores"].double()
        # independent of score_summary: the mean and the positive fraction by hand
        assert entry["attr/score_mean"] == pytest.approx(float(s.sum() / s.numel()), rel=1e-6)
        assert entry["attr/positive_fraction"] == pytest.approx(sum(float(x) > 0 for x in s) / s.numel())
        assert entry["attr/kept_fraction"] == 1.0 and entry["attr/n_dropped"] == 0.0
        assert entry["attr/seconds"] == pytest.approx(rec["seconds"])
        assert entry["attr/target_reward"] == pytest.approx(rec["target_reward"])
        # the batch's own TRL metrics sit in the same entry: generated, scored and logged on one step
        assert "reward" in entry and rec["global_step"] == entry["step"] - 1
    # report_to="none" and no log_dir: no TensorBoard events anywhere, only the run folder
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rlattr"]


def test_run_on_disk_reads_back_and_renders(tmp_path: Path) -> None:
    t = _trainer(_args(IIFGRPOConfig, tmp_path, "--attr_p", "1.0"))
    t.train()
    run = load_run(tmp_path)
    assert isinstance(run, PairRun) and run.rounds == [0, 1]
    assert run.meta["trainer"] == "IIFGRPOTrainer" and run.meta["trl_args"]["num_generations"] == 4
    assert run.meta["attribution"]["target_prompts"] == [{"prompt": p} for p in TARGET]
    for k, rec in enumerate(t.attribution_history):
        b = run.batch(k)
        assert torch.equal(b.scores, rec["scores"].float()) and torch.equal(b.keep, rec["keep"])
        assert torch.equal(b.advantages, rec["advantages"].float())
        assert len(b.prompts) == b.scores.numel() == 8 and set(b.prompts) <= set(PROMPTS)
        assert b.ids[:, 1].tolist() == [0] * 4 + [1] * 4  # two prompt groups of 4 completions
        # every pair of a group answers the same prompt
        assert len(set(b.prompts[:4])) == 1 and len(set(b.prompts[4:])) == 1
        assert run.summaries[k]["kept_fraction"] == pytest.approx(
            score_summary(b.scores, None, b.keep)["kept_fraction"]
        )
    # the top-scored pair's texts on disk are the ones the hook logged
    top = t.attribution_history[-1]["text"][0]
    b = run.batch(1)
    assert b.completions[top["index"]] == top["completion"] and b.prompts[top["index"]] == top["prompt"]
    page = write_report(tmp_path, tmp_path / "report").read_text()
    assert "RLHF run" in page and "IIFGRPOTrainer" in page and "generation batch 1" in page
    # the output folder holds a run now: a second run there is refused before training changes anything
    with pytest.raises(RunExistsError, match="already holds an rlattr run"):
        _trainer(_args(IIFGRPOConfig, tmp_path)).train()


def test_tensorboard_and_completion_tables_on_trl_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = _trainer(
        _args(
            IIFGRPOConfig,
            tmp_path,
            "--report_to",
            "tensorboard",
            "--log_completions",
            "true",
            "--attr_save",
            "false",
        )
    )
    t.train()
    acc = EventAccumulator(
        t.attribution_logger.log_dir, size_guidance={"histograms": 0, "tensors": 0}
    ).Reload()
    steps = {e.step for e in acc.Scalars("train/attr/score_mean")}
    assert steps == {1, 2} and {e.step for e in acc.Histograms("attr/score_hist")} == steps
    assert {e.step for e in acc.Tensors("attr/top_completions/text_summary")} == steps
    import pandas as pd

    table = pd.read_parquet(tmp_path / "completions" / "attr_top_bottom_00002.parquet")
    rec = t.attribution_history[-1]
    assert list(table["score"]) == [r["score"] for r in rec["text"]] and set(table["end"]) == {
        "top",
        "bottom",
    }
    assert (tmp_path / "completions" / "completions_00002.parquet").is_file()  # TRL's own table beside it
    assert not (tmp_path / "rlattr").exists()  # attr_save=False
