"""make_cnn: the digits CNN of issue 16's learned-weights benchmark (shapes, groups, parameter count)."""

from __future__ import annotations

import pytest
import torch

from rlattr.errors import RlattrError
from rlattr.testing.supervised import classification_task, make_cnn


@pytest.mark.parametrize(("conv", "side"), [(2, 8), (4, 2), (6, 2)])
def test_groups_shapes_and_parameter_count_by_hand(conv: int, side: int) -> None:
    model = make_cnn(conv=conv, channels=8, hidden=32)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    chans = [1] + [8 if i < 2 else 16 for i in range(conv)]
    n_conv = sum(c_in * c_out * 9 + c_out for c_in, c_out in zip(chans, chans[1:], strict=False))
    flat = chans[-1] * side * side  # 8x8, halved by each strided convolution
    assert sum(p.numel() for p in model.parameters()) == n_conv + flat * 32 + 32 + 32 * 10 + 10
    assert len(classification_task(model, groups="tensor").group_names) == 2 * conv + 4


def test_same_seed_same_weights_and_bad_sizes_are_named() -> None:
    a, b = make_cnn(seed=3), make_cnn(seed=3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(RlattrError, match="conv, channels, hidden: got 0, 8, 32; supported: all >= 1"):
        make_cnn(conv=0)
