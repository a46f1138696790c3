"""The tables stages exchange, built and read by the library: verdicts, triage shards, the gold batch."""

from __future__ import annotations

import pytest

from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import DataError
from trace_realign.core.evaluation import evaluation_prompts
from trace_realign.core.impact import GoldPair
from trace_realign.core.oracle.base import Verdict
from trace_realign.core.oracle.verdicts import VERDICT_SCHEMA, triage_from_verdicts, verdict_table
from trace_realign.core.reference import GOLD_SCHEMA, gold_table
from trace_realign.core.triage import TriageType, table_to_triaged, triage_pairs, triaged_to_table

PAIRS = [PreferencePair.create(f"prompt {i}", f"chosen {i}", f"rejected {i}") for i in range(4)]


def verdict(compliant):
    return Verdict(compliant=compliant, confidence=None if compliant is None else 0.9, raw="Yes" if compliant else "No")


def test_verdict_table_rows_follow_chosen_then_rejected():
    # (chosen, rejected): INVERT, PUNISH, RETAIN, and an unknown chosen verdict
    sides = [(False, True), (False, False), (True, False), (None, True)]
    verdicts = [verdict(v) for pair in sides for v in pair]
    table = verdict_table(PAIRS, verdicts, "judge-x", "abc")
    assert table.schema == VERDICT_SCHEMA
    rows = table.to_pylist()
    assert [(r["chosen_compliant"], r["rejected_compliant"]) for r in rows] == sides
    assert {r["judge"] for r in rows} == {"judge-x"} and rows[0]["pair_id"] == PAIRS[0].pair_id
    triaged = triage_from_verdicts(PAIRS, rows)
    assert [t.type for t in triaged] == [TriageType.INVERT, TriageType.PUNISH, TriageType.RETAIN, TriageType.UNKNOWN]


def test_verdict_table_refuses_a_count_that_does_not_match():
    with pytest.raises(ValueError, match="3 verdicts for 2 pairs"):
        verdict_table(PAIRS[:2], [verdict(True)] * 3, "j", "p")


def test_a_pair_without_a_verdict_row_is_unknown():
    rows = [{"pair_id": PAIRS[0].pair_id, "chosen_compliant": True, "rejected_compliant": False}]
    assert [t.type for t in triage_from_verdicts(PAIRS[:2], rows)] == [TriageType.RETAIN, TriageType.UNKNOWN]


def test_triage_shards_round_trip_with_corrections():
    triaged = triage_pairs(PAIRS, [False, False, True, None], [True, False, False, True])
    triaged[1] = type(triaged[1])(triaged[1].pair, triaged[1].type, False, False, "a better answer")
    back = table_to_triaged(triaged_to_table(triaged))
    assert back == triaged


def test_gold_table_stores_chats_as_canonical_json():
    chat = [{"role": "user", "content": "hi"}]
    table = gold_table([GoldPair("g1", chat, "good", "bad", "user"), GoldPair("g2", "text", "a", "b", "retain")])
    assert table.schema == GOLD_SCHEMA
    assert table.column("prompt").to_pylist() == ['[{"content":"hi","role":"user"}]', "text"]


def test_evaluation_prompts_come_from_the_holdout_or_fail_in_one_line():
    holdout = triage_pairs(PAIRS, [False, True, True, False], [True, False, False, False])
    prompts, groups = evaluation_prompts(holdout, None, 3)
    assert prompts == ["prompt 0", "prompt 1", "prompt 2"] and groups == ["invert", "retain", "retain"]
    with pytest.raises(DataError, match="no held-out prompts"):
        evaluation_prompts([], None, 3)
