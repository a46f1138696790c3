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
from trace_realign.core.errors import TraceError
from trace_realign.core.oracle import JudgeItem, Verdict, VerdictCache, judge_with_cache, make_judge
from trace_realign.core.oracle.cache import item_key
from trace_realign.core.policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]
POLICY_TEXT = "Never help with [violates] things."
N = 120

CHILD = textwrap.dedent(
    """
    import sys
    from trace_realign.core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge
    from trace_realign.core.policy import parse_policy

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
        assert stats == {"hits": 0, "misses": 3, "requests": 3, "reasked": 0, "refreshed": 0, "unknown": 1, "unknown_retryable": 0}
        assert cache.count() == 0


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE verdicts (
    policy_sha256 TEXT NOT NULL, judge TEXT NOT NULL, prompt_sha256 TEXT NOT NULL, response_sha256 TEXT NOT NULL,
    compliant INTEGER, confidence REAL, raw TEXT NOT NULL, reason TEXT, created REAL NOT NULL,
    PRIMARY KEY (policy_sha256, judge, prompt_sha256, response_sha256)
) WITHOUT ROWID;
CREATE TABLE corrections (
    policy_sha256 TEXT NOT NULL, judge TEXT NOT NULL, prompt_sha256 TEXT NOT NULL, response_sha256 TEXT NOT NULL,
    correction TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (policy_sha256, judge, prompt_sha256, response_sha256)
) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_schema_1_cache_is_migrated_keeping_every_paid_verdict_and_its_unknowns_heal(tmp_path):
    """A verdicts.sqlite written by the previous release (schema 1, unknowns final): opening it adds
    the attempt count, keeps every row, serves the known verdicts and asks the unknown one again."""
    db = tmp_path / "verdicts.sqlite"
    policy = parse_policy(POLICY_TEXT)
    items = batch(4)
    with FakeJudgeServer() as srv:
        judge = make_judge({"backend": "openai", "model": "fake-judge", "base_url": srv.url, "api_key_env": None})
        con = sqlite3.connect(db)
        con.executescript(V1_SCHEMA)
        rows = [
            (policy.sha256, judge.identity, *item_key(items[0]), 0, 0.8, "Yes", None, 1.0),
            (policy.sha256, judge.identity, *item_key(items[1]), 1, 0.7, "No", None, 1.0),
            (policy.sha256, judge.identity, *item_key(items[2]), None, None, "<think>cut", "the answer was cut", 1.0),
        ]
        con.executemany("INSERT INTO verdicts VALUES (?,?,?,?,?,?,?,?,?)", rows)
        con.execute("INSERT INTO corrections VALUES ('pol', 'j', 'p', 'r', 'a fix', 1.0)")
        con.commit()
        con.close()

        with VerdictCache(db) as cache:
            assert cache._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "2"
            assert cache.count() == 3 and cache.count("corrections") == 1
            found = cache.get_verdict_attempts(policy.sha256, judge.identity, [item_key(it) for it in items[:3]])
            assert found[item_key(items[0])] == (Verdict(False, 0.8, "Yes"), 1)
            assert found[item_key(items[1])] == (Verdict(True, 0.7, "No"), 1)
            assert found[item_key(items[2])][0].reason == "the answer was cut" and found[item_key(items[2])][1] == 1
            verdicts, stats = judge_with_cache(judge, items, policy, cache)
        # The two paid verdicts are served as stored (the fake would have said otherwise for item 0);
        # the unknown is asked again and item 3 for the first time.
        assert [v.compliant for v in verdicts] == [False, True, True, True]
        assert stats == {"hits": 2, "misses": 2, "requests": 2, "reasked": 1, "refreshed": 0, "unknown": 0, "unknown_retryable": 0}
        assert srv.requests == 2
    # Reopening the migrated file is a no-op.
    with VerdictCache(db) as cache:
        assert cache.count() == 4
        assert cache._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "2"


def test_a_cache_from_a_newer_release_is_one_error(tmp_path):
    db = tmp_path / "verdicts.sqlite"
    with VerdictCache(db):
        pass
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value='3' WHERE key='schema'")
    con.commit()
    con.close()
    with pytest.raises(TraceError, match=f"{db}: verdict cache has schema 3, this version reads 2"):
        VerdictCache(db)


def test_attempts_count_unknown_answers_in_a_row(tmp_path):
    key = ("p", "r")
    unknown = Verdict.unknown("answer is neither Yes nor No: 'x'", raw="x")
    with VerdictCache(tmp_path / "v.db") as cache:
        for expected in (1, 2, 3):
            cache.put_verdicts("pol", "j", [(key, unknown)])
            assert cache.get_verdict_attempts("pol", "j", [key])[key][1] == expected
        cache.put_verdicts("pol", "j", [(key, Verdict.unknown("timed out", transient=True))])  # not an answer
        assert cache.get_verdict_attempts("pol", "j", [key])[key] == (unknown, 3)
        cache.put_verdicts("pol", "j", [(key, Verdict(True, None, "No"))])
        assert cache.get_verdict_attempts("pol", "j", [key])[key] == (Verdict(True, None, "No"), 1)
        cache.put_verdicts("pol", "j", [(key, unknown)])
        assert cache.get_verdict_attempts("pol", "j", [key])[key][1] == 1
