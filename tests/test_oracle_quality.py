"""Judge agreement with reference labels: accuracy, Cohen's kappa, confusion matrix."""

import pytest
from trace_core.errors import DataError
from trace_core.oracle import judge_agreement


def test_matches_hand_counts_and_sklearn_kappa():
    pred = [True, True, False, False, True, None, False, True, None, True]
    ref = [True, False, False, True, True, True, False, True, False, False]
    out = judge_agreement(pred, ref)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (3, 2, 1, 2)
    assert out["n"] == 10 and out["n_unknown"] == 2 and out["n_known"] == 8
    assert out["accuracy"] == pytest.approx(5 / 8)
    # p_o = 5/8; p_e = P(pred T) P(ref T) + P(pred F) P(ref F) = 5/8 * 4/8 + 3/8 * 4/8 = 1/2;
    # kappa = (5/8 - 1/2) / (1 - 1/2) = 1/4 (the value sklearn's cohen_kappa_score gives too).
    assert out["cohen_kappa"] == pytest.approx(0.25)


def test_perfect_and_chance_agreement():
    assert judge_agreement([True, False, True, False], [True, False, True, False])["cohen_kappa"] == pytest.approx(1.0)
    # A judge that always says compliant agrees by chance only: kappa 0.
    out = judge_agreement([True] * 4, [True, False, True, False])
    assert out["accuracy"] == 0.5 and out["cohen_kappa"] == pytest.approx(0.0)


def test_undefined_cases_give_none():
    out = judge_agreement([None, None], [True, False])
    assert out["accuracy"] is None and out["cohen_kappa"] is None and out["n_unknown"] == 2
    assert judge_agreement([True, True], [True, True])["cohen_kappa"] is None  # one label on both sides


def test_bad_inputs():
    with pytest.raises(DataError, match="3 predictions but 2"):
        judge_agreement([True, False, True], [True, False])
    with pytest.raises(DataError, match="reference label 1"):
        judge_agreement([True, False], [True, None])
