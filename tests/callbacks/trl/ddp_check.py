"""Two-process check of the TRL hook (run by ``test_trl_ddp.py`` under torchrun, CPU, gloo).

Every rank trains IIFGRPOTrainer for two steps and writes what it saw: the gathered scores, the
keep mask, its local scores and its parameters after training. The test then checks that the
ranks agree on scores and drop decisions, that each rank's local scores are its slice of the
gathered ones, and that the parameters stayed in sync.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.testing.tiny_lm import char_tokenizer, tiny_gpt2  # noqa: E402


def digits(completions: list[str], **kwargs: object) -> list[float]:
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


class Recording(IIFGRPOTrainer):
    """Keeps each rank's local scores beside the gathered ones."""

    def _score_local(self, out):
        # IIF over several processes scores in a pass through TRL's loss before the update
        scores = super()._score_local(out)
        self.local_scores = [*getattr(self, "local_scores", []), scores.detach().clone()]
        return scores

    def _finish_fused(self, pending):
        # score-only over several processes stays fused: each rank scored its rows in its own backward
        self.local_scores = [*getattr(self, "local_scores", []), pending.scores.float().clone()]
        return super()._finish_fused(pending)


def main(out_dir: str, loss_type: str, drop: bool = True) -> None:
    torch.set_num_threads(1)
    tok = char_tokenizer()
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        bf16=False,
        loss_type=loss_type,
        ddp_backend="gloo",
    )
    data = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})
    cfg = AttributionConfig(["1+2=", "3+1=", "2+2=", "0+3="], p=1.0, drop=drop)
    t = Recording(
        model=tiny_gpt2(tok),
        reward_funcs=digits,
        args=args,
        train_dataset=data,
        processing_class=tok,
        attribution=cfg,
    )
    t.train()
    rank = t.accelerator.process_index
    torch.save(
        {
            "scores": [r["scores"] for r in t.attribution_history],
            "keep": [r["keep"] for r in t.attribution_history],
            "note": [r["note"] for r in t.attribution_history],
            "local": t.local_scores,
            "params": torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]),
            "num_processes": t.accelerator.num_processes,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2] if len(sys.argv) > 2 else "dapo",
        sys.argv[3] != "score" if len(sys.argv) > 3 else True,
    )
