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
from rlattr.callbacks.trl.batch import keep_rows  # noqa: E402
from rlattr.callbacks.trl.config import AttributionConfig  # noqa: E402
from rlattr.errors import ConfigError, RlattrError, RunExistsError  # noqa: E402
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
    # a YAML --config file sets them too (TRL's own mechanism), the command line overrides it
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("attr_target_prompts: ['0+1=', '2+3=']\nattr_target_every: 5\nattr_drop: false\n")
    argv = [
        "--config",
        str(yaml_file),
        "--output_dir",
        str(tmp_path / "y"),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
    ]
    # trl's DataClassType alias does not admit a tuple of config classes, which TrlParser accepts
    parser = TrlParser((IIFGRPOConfig,))  # type: ignore[arg-type]
    (from_yaml,) = parser.parse_args_and_config([*argv, "--attr_target_every", "7"])
    assert from_yaml.attr_target_prompts == ["0+1=", "2+3="] and from_yaml.attribution.target_every == 7
    assert from_yaml.attribution.drop is False
    # every attr_* field has a help string on the command line
    help_text = parser.format_help()
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
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            attr_target_prompts=TARGET,
            attr_drop=0,  # type: ignore[arg-type]
        )
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
    from rlattr.cli import main

    assert (
        main(["report", str(tmp_path), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    )  # rlattr report
    page = (tmp_path / "report" / "index.html").read_text()
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


class InProcessVLLMClient:
    """TRL's ``VLLMClient`` interface served by a copy of the policy in this process (no vLLM, no server).

    ``generate`` samples ``n`` completions per prompt at the given temperature and returns the sampled
    tokens' log-probs, as a vLLM server started with ``--logprobs-mode processed_logprobs`` does;
    ``update_named_params`` receives the weights TRL streams to the server before each step.
    """

    def __init__(self, model: Any, eos_token_id: int, seed: int = 0, bf16_weights: bool = False) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        self.eos = eos_token_id
        self.bf16_weights = bf16_weights  # like an engine serving bf16 weights: its log-probs differ a little
        self.generator = torch.Generator().manual_seed(seed)
        self.requests: list[list[list[int]]] = []
        self.responses: list[list[list[int]]] = []
        self.syncs = 0

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata: Any, params: Any) -> None:
        own = dict(self.model.named_parameters())
        for name, value in params:
            own[name].data.copy_(value.to(torch.bfloat16) if self.bf16_weights else value)
        self.syncs += 1

    def reset_prefix_cache(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], n: int = 1, temperature: float = 1.0, max_tokens: int = 16, **kw: Any
    ) -> dict:
        completions: list[list[int]] = []
        logprobs: list[list[list[float]]] = []
        for ids in prompts:
            x, done = torch.tensor([ids] * n), torch.zeros(n, dtype=torch.bool)
            comp: list[list[int]] = [[] for _ in range(n)]
            lps: list[list[list[float]]] = [[] for _ in range(n)]
            for _ in range(max_tokens):
                logp = torch.log_softmax(self.model(x).logits[:, -1].float() / temperature, -1)
                tok = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
                for j in range(n):
                    if not done[j]:
                        comp[j].append(int(tok[j]))
                        lps[j].append([float(logp[j, tok[j]])])
                done |= tok == self.eos
                if bool(done.all()):
                    break
                x = torch.cat([x, tok[:, None]], 1)
            completions += comp
            logprobs += lps
        self.requests.append(prompts)
        self.responses.append(completions)
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": logprobs}


def test_vllm_server_mode_generates_the_held_out_batch_through_trl_client(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """use_vllm=True (server mode, TRL's importance-sampling correction on): the f_seq batch is one more
    request to TRL's vLLM client, with no extra weight sync, and its reward is what the client sampled."""
    from trl.generation.vllm_generation import VLLMGeneration

    tok = char_tokenizer()
    model = tiny_gpt2(tok)
    client = InProcessVLLMClient(model, tok.eos_token_id)
    monkeypatch.setattr(VLLMGeneration, "_init_vllm", lambda self: setattr(self, "vllm_client", client))
    args = _args(IIFGRPOConfig, tmp_path, "--use_vllm", "true", "--vllm_mode", "server")
    assert args.vllm_importance_sampling_correction
    data = Dataset.from_dict({"prompt": PROMPTS})
    t = IIFGRPOTrainer(model=model, reward_funcs=digits, args=args, train_dataset=data, processing_class=tok)
    t.train()
    assert client.syncs == 2  # one per optimizer step, none for the held-out batch
    asked = [[tok.decode(p) for p in req] for req in client.requests]
    assert len(asked) == 4 and asked[1] == asked[3] == TARGET  # training batch, then the held-out prompts
    assert all(set(a) <= set(PROMPTS) for a in asked[0::2])
    for k, rec in enumerate(t.attribution_history):
        texts = [str(tok.decode(c, skip_special_tokens=True)) for c in client.responses[2 * k + 1]]
        expected = sum(sum(ch.isdigit() for ch in text) for text in texts) / len(texts)
        assert rec["target_reward"] == pytest.approx(expected)
        assert rec["scores"].shape == (8,) and torch.isfinite(rec["scores"]).all()
    logged = [e for e in t.state.log_history if "loss" in e]
    assert all("attr/score_mean" in e and "sampling/importance_sampling_ratio/mean" in e for e in logged)
    assert load_run(tmp_path).rounds == [0, 1]


def test_resuming_from_a_checkpoint_continues_the_run(tmp_path: Path) -> None:
    first = _trainer(_args(IIFGRPOConfig, tmp_path, "--save_strategy", "steps", "--save_steps", "2"))
    first.train()
    again = _trainer(_args(IIFGRPOConfig, tmp_path, "--max_steps", "3"))
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    run = load_run(tmp_path)
    assert isinstance(run, PairRun)
    assert run.rounds == [0, 1, 2] and [s["round"] for s in run.summaries] == [0, 1, 2]
    assert run.batch(2).global_step == 2 and torch.equal(
        run.batch(2).scores, again.attribution_history[0]["scores"]
    )


def test_vllm_scores_include_trl_importance_sampling_correction(tmp_path: Path, monkeypatch: Any) -> None:
    """The sampler's log-probs differ from the policy's (bf16 engine): TRL weights each row's loss by its
    importance-sampling ratio, and the fused scores equal grad f_seq . -grad of that loss, row by row."""
    from trl.generation.vllm_generation import VLLMGeneration

    from tests.callbacks.trl.test_fused import _f_seq_grad, _train_micro_batches
    from tests.callbacks.trl.test_trainer import N, _generate, _grad, make

    tok = char_tokenizer()
    client = InProcessVLLMClient(tiny_gpt2(tok), tok.eos_token_id, bf16_weights=True)
    monkeypatch.setattr(VLLMGeneration, "_init_vllm", lambda self: setattr(self, "vllm_client", client))
    over = {"use_vllm": True, "vllm_mode": "server", "loss_type": "grpo"}
    t = make(IIFGRPOTrainer, tmp_path, AttributionConfig(TARGET, drop=False, save=False), **over)
    assert t._attr_plan.fused, t._attr_plan.reason
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    ratio = out["importance_sampling_ratio"]
    assert (ratio - 1).abs().max() > 2e-4  # the correction is active and not trivial
    gf = _f_seq_grad(t, target_out)
    t._attr_direction = t._target_direction(target_out)
    _train_micro_batches(t, out, 1, torch.arange(N))
    # oracle: TRL's own loss (ratio included) on each row alone; grpo averages rows, so weight 1 / N
    expected = torch.stack(
        [
            -(gf @ _grad(t, t._compute_loss(t.model, keep_rows(out, torch.arange(N) == i)))) / N
            for i in range(N)
        ]
    )
    assert expected.abs().max() > 1e-5
    torch.testing.assert_close(t.attribution_history[-1]["scores"], expected, rtol=2e-3, atol=1e-6)


def test_completion_tables_go_to_wandb_and_trackio_like_trl_s(tmp_path: Path, monkeypatch: Any) -> None:
    """With log_completions, the top / bottom table is logged as a Table to the backends TRL logs its own to."""
    import sys
    import types

    from rlattr.callbacks.trl.logs import AttributionLogger

    logged: list[tuple[str, dict]] = []
    for name in ("wandb", "trackio"):
        mod = types.ModuleType(name)
        mod.run = object()  # type: ignore[attr-defined]  # an active wandb run
        mod.Table = lambda dataframe: ("table", dataframe)  # type: ignore[attr-defined]
        mod.log = lambda data, _n=name: logged.append((_n, data))  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, mod)
    rows = [
        {"index": 3, "score": 2.5, "advantage": 1.0, "prompt": "1+2=", "completion": "3", "end": "top"},
        {"index": 0, "score": -1.5, "advantage": -1.0, "prompt": "0+0=", "completion": "x", "end": "bottom"},
    ]
    logger = AttributionLogger()
    logger._pending = [{"text": rows}]
    args = types.SimpleNamespace(output_dir=str(tmp_path), report_to=["wandb", "trackio"])
    logger._write_completion_tables(args, 7)
    assert [n for n, _ in logged] == ["wandb", "trackio"]
    frame = logged[0][1]["attr/top_bottom"][1]
    assert (
        list(frame["score"]) == [2.5, -1.5]
        and list(frame["step"]) == [7, 7]
        and list(frame["end"]) == ["top", "bottom"]
    )
    assert (tmp_path / "completions" / "attr_top_bottom_00007.parquet").is_file()


def test_log_dir_is_the_one_way_to_tensorboard_without_report_to(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    t = _trainer(_args(IIFGRPOConfig, tmp_path / "out", "--attr_log_dir", str(logs), "--max_steps", "1"))
    t.train()
    acc = EventAccumulator(str(logs)).Reload()
    assert (
        acc.Tags()["histograms"] == ["attr/score_hist"] and acc.Tags()["scalars"] == []
    )  # scalars: TRL's logs
    assert [e.step for e in acc.Histograms("attr/score_hist")] == [1]
