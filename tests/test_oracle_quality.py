"""Judge agreement with reference labels: accuracy, Cohen's kappa, confusion matrix."""

import pytest
from sklearn.metrics import cohen_kappa_score

from trace_core.errors import DataError
from trace_core.oracle import judge_agreement


def test_matches_hand_counts_and_sklearn_kappa():
    pred = [True, True, False, False, True, None, False, True, None, True]
    ref = [True, False, False, True, True, True, False, True, False, False]
    out = judge_agreement(pred, ref)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (3, 2, 1, 2)
    assert out["n"] == 10 and out["n_unknown"] == 2 and out["n_known"] == 8
    assert out["accuracy"] == pytest.approx(5 / 8)
    known = [(p, r) for p, r in zip(pred, ref) if p is not None]
    expected = cohen_kappa_score([r for _, r in known], [p for p, _ in known])
    assert out["cohen_kappa"] == pytest.approx(expected)


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
