"""LearnedWeights(normalize=True): fitting on scale-normalised group contributions."""

from __future__ import annotations

import pytest
import torch

from rlattr.core.methods import GradDot, LearnedWeights
from rlattr.errors import RlattrError
from tests.core.test_methods_weighting import _signal_problem


def test_normalize_frees_the_weights_when_one_group_dwarfs_the_other():
    task, train, query = _signal_problem()
    loud = {**train, "v": 1e4 * train["v"]}  # group b's contributions 1e4 x larger, and pure noise
    plain = LearnedWeights(GradDot(task), top_k=3, steps=200, lr=0.1).cache(loud).fit(query)
    assert all(abs(w - 1.0) < 0.05 for w in plain.group_weights.values())  # the objective is flat
    fitted = LearnedWeights(GradDot(task), top_k=3, steps=200, lr=0.1, normalize=True).cache(loud).fit(query)
    base = GradDot(task).cache(loud)
    contrib = base.attribute_by_group(query)
    norms = contrib.flatten(0, 1).norm(dim=0)
    scale = norms / norms.mean()
    w = fitted.weights
    assert float(w[0] * scale[0]) > 1.9 and float(w[1] * scale[1]) < 0.1  # as on the balanced problem
    top = fitted.attribute(query).topk(3, dim=1).indices.sort(1).values
    expected = torch.arange(len(top))[:, None] * 3 + torch.arange(3)
    assert torch.equal(top, expected)  # each query's three signal records come first
    assert not torch.equal(base.attribute(query).topk(3, dim=1).indices.sort(1).values, expected)
    zero = {**train, "v": torch.zeros_like(train["v"])}
    with pytest.raises(RlattrError, match=r"queries: group\(s\) \['b'\] contribute 0 to every score"):
        LearnedWeights(GradDot(task), steps=1, normalize=True).cache(zero).fit(query)
