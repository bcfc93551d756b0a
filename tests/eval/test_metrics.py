"""Metrics on hand-computed cases, and against scipy / scikit-learn as independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from rlattr.eval.metrics import lds, loo_correlation, mislabel_auc, pearson, rankdata, spearman


def test_lds_is_one_for_a_perfect_linear_datamodel():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 20))
    masks = rng.random((15, 20)) < 0.5
    targets = 2.0 * (masks @ scores.T) + 0.7  # any increasing affine map of the linear datamodel
    assert lds(scores, masks, targets) == pytest.approx(1.0)
    assert lds(torch.tensor(scores), torch.tensor(masks), torch.tensor(-targets)) == pytest.approx(-1.0)


def test_lds_hand_worked():
    # one query, records scored [1, 2, 3]; subsets {0}, {1}, {2} predict 1, 2, 3; targets rank 1, 3, 2
    # Spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5
    scores = np.array([[1.0, 2.0, 3.0]])
    masks = np.eye(3)
    targets = np.array([[10.0], [30.0], [20.0]])
    assert lds(scores, masks, targets) == pytest.approx(0.5)
    # a second query with perfectly ranked targets: mean of 0.5 and 1.0
    scores2 = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    targets2 = np.array([[10.0, 3.0], [30.0, 2.0], [20.0, 1.0]])
    assert lds(scores2, masks, targets2) == pytest.approx(0.75)
    np.testing.assert_allclose(lds(scores2, masks, targets2, per_query=True), [0.5, 1.0])


def test_loo_correlation_hand_worked():
    # Pearson of [1, 2, 3] and [1, 3, 2]: centred [-1, 0, 1] . [-1, 1, 0] = 1, norms sqrt(2) -> 0.5
    assert loo_correlation(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]])) == pytest.approx(0.5)
    both = loo_correlation(
        np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0], [2.0, 4.0, 6.0]])
    )
    assert both == pytest.approx(0.75)


def test_correlations_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 30))
    b = a + rng.normal(size=(4, 30))
    b[0, :10] = b[0, 0]  # ties
    for j in range(4):
        assert pearson(a[j], b[j]) == pytest.approx(stats.pearsonr(a[j], b[j])[0])
        assert spearman(a[j], b[j]) == pytest.approx(stats.spearmanr(a[j], b[j])[0])
    np.testing.assert_allclose(rankdata(b), np.stack([stats.rankdata(r) for r in b]))


def test_lds_matches_scipy_on_random_data():
    rng = np.random.default_rng(2)
    scores, masks = rng.normal(size=(5, 40)), rng.random((12, 40)) < 0.5
    targets = rng.normal(size=(12, 5))
    expected = np.mean([stats.spearmanr(masks @ scores[j], targets[:, j])[0] for j in range(5)])
    assert lds(scores, masks, targets) == pytest.approx(expected)


def test_mislabel_auc():
    # flipped scores [0.9, 0.4], clean [0.5, 0.1, 0.4]: pairs won 3 + 1 + half a tie of 6 -> 4.5 / 6
    scores = np.array([0.9, 0.5, 0.4, 0.1, 0.4])
    flipped = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert mislabel_auc(scores, flipped) == pytest.approx(4.5 / 6)
    rng = np.random.default_rng(3)
    s, f = rng.normal(size=50), rng.random(50) < 0.3
    assert mislabel_auc(torch.tensor(s), torch.tensor(f)) == pytest.approx(roc_auc_score(f, s))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="masks"):
        lds(np.zeros((2, 5)), np.zeros((4, 6)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="targets"):
        lds(np.zeros((2, 5)), np.zeros((4, 5)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="scores"):
        lds(np.zeros(5), np.zeros((4, 5)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="targets"):
        lds(np.ones((1, 3)), np.eye(3), np.ones((3, 1)))  # constant target
    with pytest.raises(ValueError, match="loo_effects"):
        loo_correlation(np.zeros((2, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="scores"):
        loo_correlation(np.array([[np.nan, 1.0]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="flipped"):
        mislabel_auc(np.zeros(3), np.zeros(3))
