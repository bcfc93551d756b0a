"""Learned weights on a one-group Task say so instead of fitting one weight that changes nothing."""

from __future__ import annotations

import pytest

from rlattr.core.methods import GradDot, LearnedWeights
from rlattr.errors import RlattrError
from tests.core._tda import logreg_problem


def test_one_group_is_refused_and_two_groups_fit() -> None:
    one = logreg_problem(n=20, groups="module")  # a single Linear layer: one module, one group
    assert len(one.task.group_names) == 1
    lw = LearnedWeights(GradDot(one.task), steps=5).cache(one.train)
    with pytest.raises(RlattrError, match=r"base: got a Task with one parameter group \['0'\]; supported: "):
        lw.fit(one.query)
    two = logreg_problem(n=20, groups="tensor")
    fitted = LearnedWeights(GradDot(two.task), steps=5).cache(two.train).fit(two.query)
    assert len(fitted.group_weights) == 2
