"""The one progress bar: ground-truth retraining advances it once per job that actually runs."""

from __future__ import annotations

from contextlib import contextmanager

import torch

import rlattr.eval.groundtruth as groundtruth
from rlattr.progress import progress_bar


def test_retraining_advances_once_per_job_run(tmp_path, monkeypatch) -> None:
    seen: list[tuple[str, int]] = []
    steps: list[int] = []

    @contextmanager
    def recorder(description: str, total: int, enabled: bool | None = None):
        seen.append((description, total))
        yield lambda n=1, note="": steps.append(n)

    monkeypatch.setattr(groundtruth, "progress_bar", recorder)
    out = groundtruth.run_jobs(lambda j: torch.tensor([float(j)]), 4, out_dir=tmp_path)
    assert out.reshape(-1).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert seen == [("ground-truth retraining", 4)] and sum(steps) == 4
    (tmp_path / "job_00002.safetensors").unlink()  # resume: only the missing job runs again
    groundtruth.run_jobs(lambda j: torch.tensor([float(j)]), 4, out_dir=tmp_path)
    assert seen[-1] == ("ground-truth retraining", 1) and sum(steps) == 5


def test_bar_off_is_a_no_op_and_on_runs() -> None:
    for enabled in (False, True):
        with progress_bar("x", 2, enabled=enabled) as advance:
            advance()
            advance(note="done")


def test_a_bar_inside_another_live_display_does_not_fail() -> None:
    # SB3's progress bar is a live display on the same console; rich < 14 allows only one
    with progress_bar("outer", 1, enabled=True) as outer:
        with progress_bar("inner", 2, enabled=True) as inner:
            inner()
            inner()
        outer()


def test_featurisation_bar_counts_records_and_only_for_long_runs(monkeypatch) -> None:
    import rlattr.core.grads as grads
    from rlattr.core import Task

    calls: list[tuple[str, int, bool | None]] = []
    steps: list[int] = []

    @contextmanager
    def recorder(description: str, total: int, enabled: bool | None = None):
        calls.append((description, total, enabled))
        yield lambda n=1, note="": steps.append(n)

    monkeypatch.setattr(grads, "progress_bar", recorder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
    task = Task(model, lambda p, b: torch.func.functional_call(model, p, (b["x"],)).squeeze(1) ** 2)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    g = grads.per_record_grads(task, {"x": x}, chunk_size=1)  # 40 chunks: a bar (on a terminal)
    assert calls == [("per-record gradients", 40, None)] and steps == [1] * 40
    whole = grads.per_record_grads(task, {"x": x}, chunk_size=40)  # one chunk: never a bar
    assert calls[-1] == ("per-record gradients", 40, False)
    torch.testing.assert_close(flat(g), flat(whole), rtol=1e-5, atol=1e-6)  # chunking changes sum order only


def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1)
