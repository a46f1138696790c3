"""Judge agreement with reference labels (accuracy, Cohen's kappa, confusion matrix); the unknown-share stop."""

import pytest
from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.oracle import Verdict, check_unknown_share, judge_agreement, verdict_triples


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


# -- the unknown-share stop ----------------------------------------------------------------------

def test_unknown_share_over_the_limit_is_one_line_naming_judge_counts_example_and_fixes():
    unknown = [(None, "", "timed out"), (None, "<think>\nLet me weigh\nYes", "the answer was cut\ninside")]
    triples = [(True, "No", None)] * 34 + unknown
    with pytest.raises(TraceError) as err:
        check_unknown_share(triples, "openai:qwen3:abc123", 0.05)
    message = str(err.value)
    # 2 of 36 = 5.6 % > 5 %; the example is the first unknown that has a raw answer, as a repr.
    assert message == (
        "judge openai:qwen3:abc123: 2 of 36 verdicts unknown (5.6% > 5%); e.g. the answer "
        "'<think>\\nLet me weigh\\nYes': the answer was cut inside. Fix the judge or its settings, or raise "
        "oracle.max_unknown_share (1 disables this check); a rerun asks an LLM judge's unknown verdicts again "
        "(--fresh judge: all of them)"
    )
    assert "\n" not in message


def test_unknown_share_at_or_under_the_limit_passes_and_1_disables():
    one_in_twenty = [(None, "Maybe", "answer is neither Yes nor No: 'Maybe'")] + [(False, "Yes", None)] * 19
    assert check_unknown_share(one_in_twenty, "j", 0.05) == {"n": 20, "n_unknown": 1, "unknown_share": 0.05}
    with pytest.raises(TraceError, match=r"2 of 20 verdicts unknown \(10\.0% > 5%\)"):
        check_unknown_share(one_in_twenty[:1] * 2 + one_in_twenty[2:], "j", 0.05)
    everything = [(None, "x", "r")] * 36
    assert check_unknown_share(everything, "j", 1.0)["unknown_share"] == 1.0
    with pytest.raises(TraceError, match="evaluation.judge.max_unknown_share"):
        check_unknown_share(everything, "j", 0.5, setting="evaluation.judge")
    assert check_unknown_share([], "j", 0.0) == {"n": 0, "n_unknown": 0, "unknown_share": 0.0}
    with pytest.raises(TraceError, match=r"1 of 1 verdicts unknown \(100\.0% > 0%\); e.g. the answer '': no annotations"):
        check_unknown_share([Verdict.unknown("no annotations")], "annotations:rules", 0.0)


def test_verdict_rows_give_chosen_then_rejected_triples():
    rows = [
        {"pair_id": "a", "chosen_compliant": True, "rejected_compliant": None, "chosen_raw": "No", "rejected_raw": "Hmm",
         "chosen_reason": None, "rejected_reason": "answer is neither Yes nor No: 'Hmm'", "judge": "j"},
    ]
    assert verdict_triples(rows) == [(True, "No", None), (None, "Hmm", "answer is neither Yes nor No: 'Hmm'")]
    with pytest.raises(TraceError, match=r"1 of 2 verdicts unknown \(50\.0% > 5%\); e.g. the answer 'Hmm'"):
        check_unknown_share(verdict_triples(rows), "j", 0.05)
