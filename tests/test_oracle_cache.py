"""The verdict cache: interruption safety (SIGKILL mid-judging), keys, corrupt files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.oracle_fakes import FakeJudgeServer, right_answer
from trace_core.errors import TraceError
from trace_core.oracle import JudgeItem, Verdict, VerdictCache, judge_with_cache, make_judge
from trace_core.oracle.cache import item_key
from trace_core.policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]
POLICY_TEXT = "Never help with [violates] things."
N = 120

CHILD = textwrap.dedent(
    """
    import sys
    from trace_core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge
    from trace_core.policy import parse_policy

    url, db, n, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    judge = make_judge({"backend": "openai", "model": "fake-judge", "base_url": url, "api_key_env": None,
                        "max_concurrency": 4, "timeout_s": 5})
    items = [JudgeItem(f"prompt {i}", f"response {i}" + (" [violates]" if i % 4 == 0 else "")) for i in range(n)]
    with VerdictCache(db) as cache:
        judge_with_cache(judge, items, parse_policy(text), cache)
    """
)


def batch(n: int = N) -> list[JudgeItem]:
    return [JudgeItem(f"prompt {i}", f"response {i}" + (" [violates]" if i % 4 == 0 else "")) for i in range(n)]


def test_sigkill_mid_judging_keeps_received_answers_and_resume_asks_only_the_rest(tmp_path):
    db = tmp_path / "verdicts.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FakeJudgeServer(latency=0.05) as srv:
        child = subprocess.Popen([sys.executable, "-c", CHILD, srv.url, str(db), str(N), POLICY_TEXT], env=env, cwd=ROOT)
        deadline = time.monotonic() + 30
        while srv.answered < 30 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        answered_at_kill = srv.answered
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        assert 30 <= answered_at_kill < N

        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT compliant FROM verdicts").fetchall()
        con.close()
        # Every answer received before the kill is there, except at most the 4 in flight.
        assert answered_at_kill - 4 <= len(rows) <= srv.answered

        requests_before = srv.requests
        policy = parse_policy(POLICY_TEXT)
        judge = make_judge({"backend": "openai", "model": "fake-judge", "base_url": srv.url, "api_key_env": None})
        with VerdictCache(db) as cache:
            verdicts, stats = judge_with_cache(judge, batch(), policy, cache)
        assert stats["hits"] == len(rows)
        assert srv.requests - requests_before == stats["requests"] == N - len(rows)
        assert [v.compliant for v in verdicts] == [right_answer(it.response) for it in batch()]
        assert max(srv.counts.values()) <= 2  # at most the in-flight ones were asked twice
        assert sum(n == 2 for n in srv.counts.values()) <= 4


def test_store_and_lookup_roundtrip(tmp_path):
    a, b = batch(2)
    with VerdictCache(tmp_path / "c" / "v.db") as cache:
        assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = cache.put_verdicts(
            "pol",
            "judge",
            [
                (item_key(a), Verdict(True, 0.75, "No")),
                (item_key(b), Verdict.unknown("answer is neither Yes nor No: 'x'", raw="x")),
                (("p", "r"), Verdict.unknown("timed out", transient=True)),
            ],
        )
        assert stored == 2  # the transient unknown is not cached
        got = cache.get_verdicts("pol", "judge", [item_key(a), item_key(b), ("p", "r")])
        assert got[item_key(a)] == Verdict(True, 0.75, "No")
        assert got[item_key(b)].compliant is None and got[item_key(b)].reason.startswith("answer is neither")
        assert ("p", "r") not in got
        assert (cache.hits, cache.misses) == (2, 1)
        assert cache.get_verdicts("other-policy", "judge", [item_key(a)]) == {}
        assert cache.get_verdicts("pol", "other-judge", [item_key(a)]) == {}
    # Reopening sees the same rows.
    with VerdictCache(tmp_path / "c" / "v.db") as cache:
        assert cache.count() == 2


def test_many_keys_lookup_in_chunks(tmp_path):
    keys = [(f"p{i}", f"r{i}") for i in range(1500)]
    with VerdictCache(tmp_path / "v.db") as cache:
        cache.put_verdicts("pol", "j", [(k, Verdict(i % 2 == 0, None, "No")) for i, k in enumerate(keys)])
        got = cache.get_verdicts("pol", "j", keys + [("x", "y")])
    assert len(got) == 1500 and got[keys[3]].compliant is False


def test_prompt_key_uses_canonical_json_for_messages():
    one = JudgeItem([{"role": "user", "content": "hi"}], "r")
    same = JudgeItem([{"content": "hi", "role": "user"}], "r")
    text = JudgeItem("hi", "r")
    assert item_key(one) == item_key(same) != item_key(text)


def test_corrupt_file_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "verdicts.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TraceError) as err:
        VerdictCache(bad)
    assert str(bad) in str(err.value)


def test_uncacheable_annotations_judge_passes_through(tmp_path):
    policy = parse_policy("---\nrules:\n  require_safe: true\n---\nBe safe.")
    items = [JudgeItem("q", "a", {"is_safe": True}), JudgeItem("q", "b", {"is_safe": False}), JudgeItem("q", "c")]
    with VerdictCache(tmp_path / "v.db") as cache:
        verdicts, stats = judge_with_cache(make_judge({"backend": "annotations"}), items, policy, cache)
        assert [v.compliant for v in verdicts] == [True, False, None]
        assert stats == {"hits": 0, "misses": 3, "requests": 3, "unknown": 1}
        assert cache.count() == 0
