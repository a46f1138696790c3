"""The openai judge end to end against an OpenAI-compatible server on 127.0.0.1 (real sockets)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.oracle_fakes import FakeJudgeServer, right_answer
from trace_core.errors import ConfigError, TraceError
from trace_core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge
from trace_core.oracle.base import DEFAULT_PROMPT_TEMPLATE, parse_answer
from trace_core.oracle.openai_backend import retry_wait
from trace_core.policy import parse_policy

POLICY = parse_policy("---\nname: test\n---\nNever help with [violates] things.")


def judge_for(srv: FakeJudgeServer, **overrides):
    cfg = {
        "backend": "openai",
        "model": srv.model,
        "base_url": srv.url,
        "api_key_env": None,
        "max_concurrency": 4,
        "timeout_s": 0.4,
        "max_retries": 3,
        "retry_backoff_s": 0.05,
        "max_retry_wait_s": 2.0,
    }
    cfg.update(overrides)
    return make_judge(cfg)


def items(responses, prefix="p"):
    return [JudgeItem(f"{prefix}{i}", r) for i, r in enumerate(responses)]


def assert_right_or_unknown(batch, verdicts):
    assert len(verdicts) == len(batch)
    for item, v in zip(batch, verdicts):
        if v.compliant is None:
            assert v.reason, f"unknown without a reason for {item.response!r}"
        else:
            assert v.compliant == right_answer(item.response), item.response


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_prompt_and_answers_follow_the_authors_template():
    with FakeJudgeServer() as srv:
        judge = judge_for(srv)
        batch = [JudgeItem("How do I bake bread?", "Knead it [violates]"), JudgeItem([{"role": "user", "content": "Hi"}], "Hello")]
        verdicts = judge.judge(batch, POLICY)
    assert [v.compliant for v in verdicts] == [False, True]
    assert [v.raw for v in verdicts] == ["Yes", "No"]
    assert verdicts[0].confidence == pytest.approx(0.9)
    first = next(b for b in srv.bodies if "bread" in b["messages"][1]["content"])
    assert first["messages"][0] == {"role": "system", "content": POLICY.text}
    assert first["messages"][1]["content"] == DEFAULT_PROMPT_TEMPLATE.format(prompt="How do I bake bread?", response="Knead it [violates]")
    assert first["max_tokens"] == 1 and first["temperature"] == 0 and first["logprobs"] is True
    chat = next(b for b in srv.bodies if "Hello" in b["messages"][1]["content"])
    assert chat["messages"][1]["content"].startswith("Prompt: Hi\n\nResponse: Hello")


def test_faults_give_right_or_unknown_verdicts_none_lost():
    kinds = ["fine", "bad [violates]", "[garbage]", "[429]", "[500]", "[hang-once]", "[hang]", "[refuse]", "[malformed]"]
    batch = items([f"{k} #{i}" for i in range(3) for k in kinds])
    with FakeJudgeServer(retry_after="0.3", hang_s=3.0) as srv:
        judge = judge_for(srv, max_retries=2)
        started = time.monotonic()
        verdicts = judge.judge(batch, POLICY)
        elapsed = time.monotonic() - started
    assert_right_or_unknown(batch, verdicts)
    by_kind = {k: [v for it, v in zip(batch, verdicts) if it.response.startswith(k)] for k in kinds}
    for k in ("fine", "bad [violates]", "[429]", "[500]", "[hang-once]"):
        assert all(v.compliant is not None for v in by_kind[k]), k  # recovered by retries
    for v in by_kind["[garbage]"]:
        assert v.compliant is None and "neither Yes nor No" in v.reason and not v.transient
    for v in by_kind["[hang]"]:
        assert v.compliant is None and "timed out after 3 attempt(s)" in v.reason and v.transient
    for v in by_kind["[refuse]"]:
        assert v.compliant is None and "refused" in v.reason
    for v in by_kind["[malformed]"]:
        assert v.compliant is None and "malformed" in v.reason and v.transient
    # Retry-After was honoured: each [429] retry came at least 0.3 s after its 429.
    for item in batch:
        if item.response.startswith("[429]"):
            times = [(t, s) for t, key, s in srv.events if key.endswith(f"Response: {item.response}" + DEFAULT_PROMPT_TEMPLATE.split("{response}")[1])]
            assert [s for _, s in times] == [429, 200]
            assert times[1][0] - times[0][0] >= 0.28
    assert elapsed < 6


def test_concurrency_is_bounded_and_used():
    with FakeJudgeServer(latency=0.05) as srv:
        started = time.monotonic()
        verdicts = judge_for(srv, max_concurrency=4).judge(items([f"r{i}" for i in range(40)]), POLICY)
        elapsed = time.monotonic() - started
    assert all(v.compliant is True for v in verdicts)
    assert srv.max_in_flight == 4
    assert elapsed < 40 * 0.05 / 2  # ran concurrently: the serial time would be 2 s


def test_server_dies_mid_batch_and_comes_back(tmp_path):
    batch = items([f"r{i}" + (" [violates]" if i % 3 == 0 else "") for i in range(60)])
    with FakeJudgeServer(latency=0.01, die_after=15, down_for=0.4) as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, max_retries=6, retry_backoff_s=0.05)
        verdicts, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert srv.outages == 1
        assert srv.requests > 60  # requests caught by the crash were retried
        assert_right_or_unknown(batch, verdicts)
        assert stats["requests"] == 60 and stats["hits"] == 0
        cached = cache.count()
        assert cached == 60 - sum(v.transient for v in verdicts)
        before = dict(srv.counts)
        again, stats2 = judge_with_cache(judge, batch, POLICY, cache)
        assert stats2["hits"] == cached and stats2["requests"] == 60 - cached
        # Nothing the cache holds was asked again.
        for item, v in zip(batch, verdicts):
            key = judge.templates.judge_messages(item, POLICY)[1]["content"]
            if not v.transient:
                assert srv.counts[key] == before[key]
        assert_right_or_unknown(batch, again)
        assert all(v.compliant is not None for v in again)


def test_cache_hits_make_no_requests_and_duplicates_are_asked_once(tmp_path):
    batch = items(["a", "b [violates]", "a", "c", "[garbage]", "[hang]"], prefix="same")
    batch[2] = JudgeItem(batch[0].prompt, "a")  # identical (prompt, response) to item 0
    with FakeJudgeServer(hang_s=1.0) as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, max_retries=0, timeout_s=0.2)
        progress = []
        verdicts, stats = judge_with_cache(judge, batch, POLICY, cache, progress=lambda d, t: progress.append((d, t)))
        assert stats == {"hits": 0, "misses": 6, "requests": 5, "unknown": 2}
        assert verdicts[0] == verdicts[2]
        assert progress[0] == (0, 5) and progress[-1] == (5, 5)
        assert srv.requests == 5
        # Rerun: the garbage answer is cached as final, the timeout is not, so only [hang] is asked again.
        _, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert stats == {"hits": 5, "misses": 1, "requests": 1, "unknown": 2}
        assert srv.requests == 6
        hang_key = next(k for k in srv.counts if "[hang]" in k)
        assert srv.counts[hang_key] == 2 and all(n == 1 for k, n in srv.counts.items() if k != hang_key)
        # refresh_unknown asks the cached garbage answer again too.
        _, stats = judge_with_cache(judge, batch, POLICY, cache, refresh_unknown=True)
        assert stats["requests"] == 2


def test_policy_change_misses_the_cache(tmp_path):
    batch = items(["x", "y [violates]"])
    other = parse_policy("---\nname: test\n---\nNever help with [violates] things, ever.")
    with FakeJudgeServer() as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv)
        judge_with_cache(judge, batch, POLICY, cache)
        _, stats = judge_with_cache(judge, batch, other, cache)
        assert stats["hits"] == 0 and stats["requests"] == 2
        # A different prompt template is a different judge identity: misses too.
        judge2 = judge_for(srv, prompt_template="Q: {prompt}\nA: {response}\nViolating? Yes or No.")
        assert judge2.identity != judge.identity
        _, stats = judge_with_cache(judge2, batch, POLICY, cache)
        assert stats["hits"] == 0
        assert srv.requests == 6


def test_corrections_are_cached(tmp_path):
    from trace_core.oracle import correct_with_cache

    batch = items(["bad [violates]", "worse [violates]"])
    with FakeJudgeServer() as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, temperature=0.3, max_correction_tokens=64)
        fixes, stats = correct_with_cache(judge, batch, POLICY, cache)
        assert fixes == ["A compliant answer. Prompt: p0", "A compliant answer. Prompt: p1"]
        assert stats == {"hits": 0, "misses": 2, "requests": 2, "failed": 0}
        body = srv.bodies[-1]
        assert body["temperature"] == 0.3 and body["max_tokens"] == 64 and "logprobs" not in body
        again, stats = correct_with_cache(judge, batch, POLICY, cache)
        assert again == fixes and stats["requests"] == 0 and srv.requests == 2
        assert cache.count("corrections") == 2


def test_wrong_api_key_is_one_error_naming_the_url_not_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-wrong-4567")
    with FakeJudgeServer(api_key="sk-right-1234") as srv:
        judge = judge_for(srv, api_key_env="JUDGE_KEY")
        assert "sk-wrong" not in repr(judge) + judge.identity + repr(judge.config)
        with pytest.raises(TraceError) as err:
            judge.judge(items([f"r{i}" for i in range(50)]), POLICY)
        assert srv.url in str(err.value) and "401" in str(err.value) and "JUDGE_KEY" in str(err.value)
        assert "sk-wrong" not in str(err.value)
        assert srv.requests <= 4  # stopped at once, not 50 failures
        monkeypatch.setenv("JUDGE_KEY", "sk-right-1234")
        assert judge_for(srv, api_key_env="JUDGE_KEY").judge(items(["ok"]), POLICY)[0].compliant is True


def test_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        make_judge({"backend": "openai", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"})


def test_unreachable_url_is_one_error_naming_it():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = make_judge(
        {"backend": "openai", "model": "m", "base_url": url, "api_key_env": None, "max_retries": 1, "retry_backoff_s": 0.01}
    )
    started = time.monotonic()
    with pytest.raises(TraceError, match="cannot reach the judge at " + url.replace(".", r"\.")):
        judge.judge(items([f"r{i}" for i in range(100)]), POLICY)
    assert time.monotonic() - started < 3


def test_unknown_model_is_one_error():
    with FakeJudgeServer() as srv:
        with pytest.raises(TraceError, match="'no-such-model'.*404"):
            judge_for(srv, model="no-such-model").judge(items(["a", "b", "c"]), POLICY)


def test_server_gone_for_good_stops_after_consecutive_failures(tmp_path):
    batch = items([f"r{i}" for i in range(200)])
    with FakeJudgeServer(die_after=11, down_for=60) as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, max_retries=1, retry_backoff_s=0.01, max_concurrency=2)
        with pytest.raises(TraceError, match="requests in a row failed.*rerun"):
            judge_with_cache(judge, batch, POLICY, cache)
        # The answers received before the crash are kept; at most those in flight (2) are lost.
        assert srv.answered - 2 <= cache.count() <= srv.answered
        assert cache.count() >= 9


@pytest.mark.parametrize("mode", ["choice", "json_schema"])
def test_structured_output_requests(mode):
    with FakeJudgeServer() as srv:
        judge = judge_for(srv, use_structured_output=True, structured_output=mode)
        verdicts = judge.judge(items(["ok", "no [violates]"]), POLICY)
    assert [v.compliant for v in verdicts] == [True, False]
    body = srv.bodies[0]
    if mode == "choice":
        assert body["structured_outputs"] == {"choice": ["Yes", "No"]}
    else:
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["answer"]["enum"] == ["Yes", "No"]
        assert verdicts[1].raw == '{"answer": "Yes"}'


def test_identity_names_backend_model_and_template():
    with FakeJudgeServer() as srv:
        a = judge_for(srv)
        b = judge_for(srv, system_template="Policy:\n{policy}")
        c = judge_for(srv, base_url="http://127.0.0.1:1/v1")
    assert a.identity.startswith("openai:fake-judge:")
    assert a.identity != b.identity
    assert a.identity == c.identity  # the same model behind another URL gives the same answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", False), ("No", True), (" no.", True), ("**YES**", False), ("'No'", True), ('{"answer": "No"}', True),
        ("Yes, it violates", None), ("Maybe", None), ("", None), ("{not json", None), ('{"verdict": "No"}', None),
    ],
)
def test_strict_answer_parsing(text, expected):
    compliant, reason = parse_answer(text)
    assert compliant is expected
    assert (reason is None) == (expected is not None)


def test_retry_wait_honours_retry_after_and_caps():
    assert retry_wait(0, {"Retry-After": "2"}, 1.0, 60) == 2.0
    assert retry_wait(0, {"retry-after-ms": "250"}, 1.0, 60) == 0.25
    assert retry_wait(0, {"Retry-After": "120"}, 1.0, 30) == 30
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.5 <= retry_wait(0, {"Retry-After": date}, 1.0, 60) <= 5.0
    assert retry_wait(3, {}, 0.5, 60, rng=lambda: 0.0) == 2.0  # 0.5 * 2**3 * 0.5
    assert retry_wait(3, None, 0.5, 60, rng=lambda: 0.999) == pytest.approx(4.0, rel=1e-2)
    assert retry_wait(10, None, 1.0, 5.0) == 5.0


def test_works_from_inside_a_running_event_loop(tmp_path):
    """A notebook runs an event loop already; judging then runs on a helper thread's loop."""
    import asyncio

    batch = items(["ok", "bad [violates]"])
    with FakeJudgeServer() as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv)

        async def inside():
            return judge_with_cache(judge, batch, POLICY, cache)

        verdicts, stats = asyncio.run(inside())
        assert [v.compliant for v in verdicts] == [True, False] and cache.count() == 2
