"""Cost of the slow per-row path (layers without a capture handler) vs the fused scores, tiny GPT-2.

Every LayerNorm is made uncovered (its handler unregistered), one GRPO micro-batch of 8 pairs is
trained (TRL's compute_loss + backward, captured), then timed: the fused scores of the covered layers
and the slow path (one forward + backward of TRL's loss per pair, LayerNorm parameters only).
Medians of repeats, one thread. Run: ``.venv/bin/python experiments/bench_trl_fallback.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (its fixtures)

from rlattr.callbacks.trl.fused import micro_batch_scores  # noqa: E402
from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.core import ghost_layers  # noqa: E402
from tests.callbacks.trl.test_trainer import PROMPTS, TARGET, N, _generate, make  # noqa: E402

REPEATS = 7


def main() -> None:
    torch.set_num_threads(1)
    del ghost_layers._HANDLERS[nn.LayerNorm]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make(IIFGRPOTrainer, Path(tmp), AttributionConfig(TARGET, drop=False))
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    t._attr_direction = t._target_direction(target_out)
    out = dict(out, attr_row=torch.arange(N))
    step, fused, slow = [], [], []
    for _ in range(REPEATS):
        t.model.zero_grad()
        t0 = time.perf_counter()
        with t._attr_capture.recording(rows=N) as records:
            loss = t._compute_loss(t.model, out)
        loss.backward()
        t1 = time.perf_counter()
        micro_batch_scores(t._attr_capture, records, t._attr_direction)
        t2 = time.perf_counter()
        t._slow_part(out)
        t3 = time.perf_counter()
        step.append(t1 - t0)
        fused.append(t2 - t1)
        slow.append(t3 - t2)
    n_slow = sum(p.numel() for p in t._attr_slow.values())
    n_all = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    result = {
        "pairs": N,
        "params_trainable": n_all,
        "params_slow_path": n_slow,
        "loss_and_backward_s_per_pair": statistics.median(step) / N,
        "fused_scores_s_per_pair": statistics.median(fused) / N,
        "slow_path_s_per_pair": statistics.median(slow) / N,
        "repeats": REPEATS,
        "torch": torch.__version__,
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
