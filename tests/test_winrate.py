"""Win rate (evaluation.winrate) and the pairwise comparison of the judges."""

from __future__ import annotations

import pytest

from tests.oracle_fakes import FakeJudgeServer
from tests.test_oracle_local_judges import TOPICS, _toy_data
from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.evaluation import pair_outcome, win_rate
from trace_realign.core.oracle import make_judge
from trace_realign.core.oracle.annotations import AnnotationsJudge
from trace_realign.core.oracle.base import Comparison, JudgeItem, comparison_from_answer
from trace_realign.core.oracle.local_judges import EmbeddingComplianceJudge
from trace_realign.core.policy import parse_policy

POLICY = parse_policy("Answer questions helpfully; refuse only critical harm.")


def _c(winner):
    return Comparison(winner=winner, raw=str(winner))


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        ("A", "B", "win"),  # a preferred as A, and again as B
        ("B", "A", "loss"),
        ("A", "A", "tie"),  # the judge preferred whatever stood first: position bias cancels
        ("B", "B", "tie"),
        ("tie", "tie", "tie"),
        ("A", "tie", "tie"),
        ("tie", "A", "tie"),
        (None, "B", None),
        ("A", None, None),
    ],
)
def test_pair_outcome_needs_both_orders_to_agree(first, second, outcome):
    assert pair_outcome(_c(first), _c(second)) == outcome


def test_pairwise_answers_parse_strictly():
    for text, winner in (("A", "A"), ("**b**", "B"), ("Tie.", "tie"), ("Answer: B", "B"), ('{"answer": "tie"}', "tie")):
        assert comparison_from_answer(text).winner == winner, text
    for text in ("A or B", "Response A", ""):
        found = comparison_from_answer(text)
        assert found.winner is None and found.reason, text
    assert "A, B or tie line" in comparison_from_answer("", reasoning="I think the first.").reason


def _openai(url):
    return make_judge({"backend": "openai", "model": "fake-judge", "base_url": url, "api_key_env": None, "max_retries": 0})


def test_win_rate_asks_both_orders_of_the_fake_server_and_counts_by_hand():
    prompts = [f"Question {i}?" for i in range(6)]
    a = ["A careful answer.", "Harm [violates]", "Fine one.", "Bad one [violates]", "Same answer.", "[garbage] odd"]
    b = ["Harm [violates]", "A careful answer.", "Fine two.", "Bad two [violates]", "Same answer.", "Something else."]
    with FakeJudgeServer() as server:
        result = win_rate(_openai(server.url), POLICY, prompts, a, b)
        asked = list(server.counts)
    # 0: a wins both orders; 1: a loses both; 2: the fake prefers position A (inconsistent -> tie);
    # 3: the fake says tie; 4: identical, a tie without asking; 5: unparsable, left out.
    assert [r["outcome"] for r in result.rows] == ["win", "loss", "tie", "tie", "tie", None]
    assert (result.win, result.loss, result.tie, result.n, result.n_unknown) == (1, 1, 3, 5, 1)
    assert result.win_rate == pytest.approx(20.0) and result.loss_rate == pytest.approx(20.0)
    assert result.tie_rate == pytest.approx(60.0)
    assert [(r["first"], r["second"]) for r in result.rows[:5]] == [("A", "B"), ("B", "A"), ("A", "A"), ("tie", "tie"), (None, None)]
    assert "neither A nor B nor tie" in result.rows[5]["reason"]
    assert len(asked) == 10  # five differing pairs, each in both orders; the identical one never asked
    for i in (0, 1, 2, 3, 5):
        for x, y in ((a[i], b[i]), (b[i], a[i])):
            assert any(f"Response A: {x}\n\nResponse B: {y}\n\n" in q for q in asked), (i, x)
    assert result.metrics() == {"win_n": 5.0, "win_n_unknown": 1.0, "win_rate": 20.0, "loss_rate": 20.0, "tie_rate": 60.0}


def test_win_rate_with_the_local_embedding_judge_compares_compliance_probabilities():
    items, labels = _toy_data()
    judge = EmbeddingComplianceJudge.fit(items, labels, POLICY)
    prompts = [p for p, _ in TOPICS[:4]]
    helpful = [answer for _, answer in TOPICS[:4]]
    refusal = ["I'm sorry, but I can't help with that request."] * 4
    mixed = [helpful[0], refusal[1], helpful[2] + " Indeed.", refusal[3]]
    result = win_rate(judge, POLICY, prompts, mixed, [refusal[0], helpful[1], helpful[2], refusal[3]])
    p = judge.predict_proba
    expected = []
    for i, (x, y) in enumerate(zip(mixed, [refusal[0], helpful[1], helpful[2], refusal[3]])):
        if x == y:
            expected.append("tie")
            continue
        d = p([JudgeItem(prompts[i], x)])[0] - p([JudgeItem(prompts[i], y)])[0]
        expected.append("win" if d > judge.tie_margin else "loss" if d < -judge.tie_margin else "tie")
    assert [r["outcome"] for r in result.rows] == expected
    assert expected[:2] == ["win", "loss"] and expected[3] == "tie"  # a helpful answer beats a refusal here
    assert result.n == 4 and result.n_unknown == 0
    assert result.rows[0]["first"] == "A" and result.rows[0]["second"] == "B"  # symmetric by construction


def test_a_judge_that_can_neither_compare_nor_score_says_so():
    with pytest.raises(TraceError, match="can neither compare two responses nor score one"):
        win_rate(AnnotationsJudge(), POLICY, ["p"], ["x"], ["y"])
    with pytest.raises(DataError, match="2 prompts, 1 responses a"):
        win_rate(AnnotationsJudge(), POLICY, ["p", "q"], ["x"], ["y"])
