"""The audit's metrics against hand-computed cases (and scipy's KS test where it is installed)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsynth.unlearning.audit_metrics import (
    TokenStats,
    auc,
    ks_pvalue,
    ks_statistic,
    log_truth_ratio,
    mia_aucs,
    mia_scores,
    ranks_last,
    token_stats,
)

LOG3 = math.log(3.0)


def test_auc_counts_pairs_and_halves_ties():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    # Pairs (member, non-member): (2,1) win, (2,2) tie, (2,3) loss, (5,*) 3 wins -> (1 + .5 + 3) / 6.
    assert auc([2, 5], [1, 2, 3]) == pytest.approx(4.5 / 6)
    assert auc([1, 1], [1]) == 0.5


@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
)
def test_auc_equals_the_pairwise_count(members, non_members):
    wins = sum((a > b) + 0.5 * (a == b) for a in members for b in non_members)
    assert auc(members, non_members) == pytest.approx(wins / (len(members) * len(non_members)))


def test_token_stats_give_log_probabilities_and_min_k_pp_z_scores():
    # One row, vocabulary 2: position 0 predicts label 1 with p = (1/2, 1/2); position 1 predicts
    # label 0 with p = (3/4, 1/4). The last position predicts nothing.
    logits = torch.tensor([[[0.0, 0.0], [LOG3, 0.0], [9.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    (stats,) = token_stats(logits, labels)
    assert stats.logprobs == pytest.approx((math.log(0.5), math.log(0.75)))
    # Position 0: uniform, sigma = 0 -> z = 0 (log p = mu). Position 1: mu = 3/4 log 3/4 + 1/4 log 1/4.
    mu = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    sigma = math.sqrt(0.75 * math.log(0.75) ** 2 + 0.25 * math.log(0.25) ** 2 - mu**2)
    assert stats.z_scores == pytest.approx((0.0, (math.log(0.75) - mu) / sigma))
    assert stats.mean_nll == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def test_mia_scores_follow_their_formulas():
    stats = [TokenStats((-1.0, -3.0, -2.0, -0.5, -4.0), (0.5, -1.0, 0.0, 1.0, -2.0))]
    text = "Velkor"
    scores = mia_scores(stats, [text], k=0.2)
    assert scores["loss"] == [pytest.approx(-10.5 / 5)]
    assert scores["zlib"] == [pytest.approx(-10.5 / len(zlib.compress(text.encode())))]
    assert scores["min_k"] == [-4.0]  # 20% of 5 tokens: the single lowest
    assert scores["min_k_pp"] == [-2.0]
    assert mia_scores(stats, [text], k=0.4)["min_k"] == [pytest.approx(-3.5)]  # two lowest
    with pytest.raises(ValueError, match="2 texts"):
        mia_scores(stats, [text, text])


def test_mia_aucs_report_the_gap_from_chance_both_ways():
    members = {"loss": [0.0, 0.1], "zlib": [1.0, 2.0]}
    non_members = {"loss": [1.0, 2.0], "zlib": [0.0, 0.5]}
    found = mia_aucs(members, non_members)
    assert found["loss"] == {"auc": 0.0, "gap": 0.5}  # members *less* likely: leaks as much
    assert found["zlib"] == {"auc": 1.0, "gap": 0.5}


def test_truth_ratio_by_hand():
    # Perturbed answers with mean NLLs 1 and 2 (probabilities e^-1, e^-2); the truth at NLL 0.5.
    expected = math.log((math.exp(-1) + math.exp(-2)) / 2) + 0.5
    assert log_truth_ratio(0.5, [1.0, 2.0]) == pytest.approx(expected)
    assert log_truth_ratio(1.0, [1.0, 1.0]) == pytest.approx(0.0)
    assert log_truth_ratio(800.0, [900.0, 1000.0]) == pytest.approx(-100 + math.log((1 + math.exp(-100)) / 2))
    assert ranks_last(3.0, [1.0, 2.0]) and not ranks_last(1.5, [1.0, 2.0])


def test_ks_statistic_and_exact_p_value_by_hand():
    assert ks_statistic([1, 2], [3, 4]) == 1.0
    # n = m = 2, d = 1: paths that stay strictly inside |i - j| < 2 avoid the two corner paths.
    assert ks_pvalue([1, 2], [3, 4]) == pytest.approx(2 / 6)
    assert ks_pvalue([1, 3], [2, 4]) == pytest.approx(1.0)
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0 and ks_pvalue([1, 2, 3], [1, 2, 3]) == 1.0


@given(
    st.lists(st.floats(-10, 10), min_size=1, max_size=25, unique=True),
    st.lists(st.floats(-10, 10), min_size=1, max_size=25, unique=True),
)
def test_ks_agrees_with_scipy_exact(a, b):
    stats = pytest.importorskip("scipy.stats")
    if set(a) & set(b):
        return  # the exact test is for continuous data (no ties across samples)
    want = stats.ks_2samp(a, b, method="exact")
    assert ks_statistic(a, b) == pytest.approx(want.statistic)
    assert ks_pvalue(a, b) == pytest.approx(want.pvalue, rel=1e-6, abs=1e-12)
