"""The openai judge end to end against an OpenAI-compatible server on 127.0.0.1 (real sockets)."""

from __future__ import annotations

import math
import socket
import time

import pytest

from tests.oracle_fakes import REASON_P, FakeJudgeServer, right_answer
from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.oracle import JudgeItem, VerdictCache, check_unknown_share, judge_with_cache, make_judge
from trace_realign.core.oracle.base import DEFAULT_PROMPT_TEMPLATE, answer_token_top, parse_answer, verdict_from_answer
from trace_realign.core.oracle.cache import item_key
from trace_realign.core.oracle.openai_backend import content_text, retry_wait
from trace_realign.core.policy import parse_policy

POLICY = parse_policy("---\nname: test\n---\nNever help with [violates] things.")


def judge_for(srv: FakeJudgeServer, where: str = "judge", **overrides):
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
    return make_judge(cfg, where)


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
        assert stats == {"hits": 0, "misses": 6, "requests": 5, "reasked": 0, "refreshed": 0, "unknown": 2, "unknown_retryable": 2}
        assert verdicts[0] == verdicts[2]
        assert progress[0] == (0, 5) and progress[-1] == (5, 5)
        assert srv.requests == 5
        # Rerun: the timeout was not cached, the garbage answer was, with 1 attempt of 3: both are
        # asked again; the three known verdicts (four items) are not.
        _, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert stats == {"hits": 4, "misses": 2, "requests": 2, "reasked": 1, "refreshed": 0, "unknown": 2, "unknown_retryable": 2}
        assert srv.requests == 7
        unknown_keys = [k for k in srv.counts if "[hang]" in k or "[garbage]" in k]
        assert all(srv.counts[k] == 2 for k in unknown_keys)
        assert all(n == 1 for k, n in srv.counts.items() if k not in unknown_keys)
        # refresh_unknown asks the cached garbage answer again too.
        _, stats = judge_with_cache(judge, batch, POLICY, cache, refresh_unknown=True)
        assert stats["requests"] == 2 and stats["reasked"] == 1


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
    from trace_realign.core.oracle import correct_with_cache

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


@pytest.mark.parametrize("where", ["oracle", "evaluation.judge"])
def test_missing_key_variable_is_a_config_error_naming_the_setting_and_the_local_server_fix(monkeypatch, where):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError) as err:
        make_judge({"backend": "openai", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"}, where)
    assert str(err.value) == (
        f"{where}.api_key_env: environment variable NO_SUCH_KEY_VAR is not set (it should hold the API key); "
        f"for a local server without auth set {where}.api_key_env: null"
    )
    monkeypatch.setenv("NO_SUCH_KEY_VAR", "")  # set but empty is not a key either
    with pytest.raises(ConfigError, match=r"judge\.api_key_env: null"):
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
        # the final answer after a reasoning block (the example, then siblings)
        ("<think>\nIs it Yes? Maybe not.\n</think>\n\nNo", True),
        ("<thinking>No harm? No...</thinking>\nYes.", False),
        ("<THINK>x</THINK> **No**", True),
        ("Okay, Yes or No? The prompt opened the block.\n</think>\n\nNo", True),  # DeepSeek-R1 style
        ("<think>a</think><think>b</think>\nYes", False),
        ("<think>\nStill thinking, probably No", None),  # open block: no final answer
        ("<think>done</think>", None),  # nothing after the reasoning
        ("<think>a</think>Yes<think>b</think>No", None),  # two answers outside the blocks
        ("Yes <think>on second thought</think> No", None),
        ("<think>fine</think>\nNo, but yes", None),
        # code fences, labels, variants
        ("```\nNo\n```", True), ("```No```", True), ('```json {"answer":"No"} ```', True),
        ('```json\n{"answer": "Yes"}\n```', False), ("Answer: No", True), ("**Final answer:** Yes", False),
        ("NO.", True), ("`yes`", False),
        ("No, but yes", None), ("The answer is No.", None), ("```\nNo, it is fine\n```", None), ("Answer: maybe", None),
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


# -- reasoning judges and answer formats (issue 10, item 6) ------------------------------------------

# marker -> (known?, confidence the verdict must carry, a phrase of the reason when unknown)
SHAPE_EXPECTATIONS = {
    "[think]": (True, 0.9, None),  # <think>...</think>\n\nNo, the example
    "[thinking]": (True, 0.9, None),
    "[r1]": (True, 0.9, None),
    "[reasoning-split]": (True, 0.9, None),  # content after the reasoning, log-probs over both
    "[reasoning-field]": (True, None, None),  # content null, the answer in reasoning_content
    "[reasoning-attr]": (True, None, None),  # content "", "Answer: No" ending the `reasoning` field
    "[parts]": (True, 0.9, None),  # content as a list of parts
    "[fence]": (True, 0.9, None),
    "[json-fence]": (True, 0.9, None),
    "[bold]": (True, 0.9, None),  # **YES**
    "[think-open]": (False, None, "inside a reasoning block (<think> without </think>)"),
    "[think-cut]": (False, None, "cut at max_answer_tokens=1 inside a reasoning block; raise oracle.max_answer_tokens"),
    "[reasoning-cut]": (False, None, "cut at max_answer_tokens=1 inside a reasoning block; raise oracle.max_answer_tokens"),
    "[reasoning-prose]": (False, None, "the reasoning does not end with a Yes or No line"),
    "[sentence]": (False, None, "answer is neither Yes nor No: "),  # "No, but yes" (the issue's), "Yes, but no"
}


def test_reasoning_judges_and_answer_formats_are_read_strictly():
    batch = [JudgeItem(f"q {m}", f"r {m}{v}") for m in SHAPE_EXPECTATIONS for v in ("", " [violates]")]
    with FakeJudgeServer() as srv:
        verdicts = judge_for(srv, where="oracle").judge(batch, POLICY)
    for item, v in zip(batch, verdicts):
        marker = next(m for m in SHAPE_EXPECTATIONS if m in item.response)
        known, confidence, reason = SHAPE_EXPECTATIONS[marker]
        if known:
            assert v.compliant == right_answer(item.response), item.response
            # The answer token's probability (0.9), never that of a Yes/No thought aloud (0.6).
            assert v.confidence == (pytest.approx(confidence) if confidence else None), item.response
            assert v.confidence != pytest.approx(REASON_P)
        else:
            assert v.compliant is None and reason in v.reason and not v.transient, (item.response, v.reason)
            if marker == "[sentence]":
                assert v.reason.endswith("'Yes, but no'" if "[violates]" in item.response else "'No, but yes'")


def test_a_server_answering_in_thoughts_heals_after_it_is_fixed(tmp_path):
    """The issue's run: every verdict unknown (cut inside the reasoning) -> the unknown share stops
    the run naming the judge and one raw answer -> once the server is fixed, the next run asks the
    unknowns again and they heal; the run after that asks nothing."""
    batch = items([f"r{i}" + (" [violates]" if i % 3 == 0 else "") for i in range(6)])
    with FakeJudgeServer(shape="[reasoning-cut]") as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, where="oracle")
        verdicts, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert stats["unknown"] == 6 and stats["requests"] == 6
        assert cache.count() == 6  # unknowns from answers are kept, with their attempt count
        with pytest.raises(TraceError) as err:
            check_unknown_share([(v.compliant, v.raw, v.reason) for v in verdicts], judge.identity, 0.05)
        message = str(err.value)
        assert message.startswith(f"judge {judge.identity}: 6 of 6 verdicts unknown (100.0% > 5%)")
        assert "'Let me weigh Yes and'" in message and "raise oracle.max_answer_tokens" in message
        assert "\n" not in message

        srv.shape = None  # the server is fixed
        again, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert stats == {"hits": 0, "misses": 6, "requests": 6, "reasked": 6, "refreshed": 0, "unknown": 0, "unknown_retryable": 0}
        assert [v.compliant for v in again] == [right_answer(it.response) for it in batch]
        assert check_unknown_share(again, judge.identity, 0.05) == {"n": 6, "n_unknown": 0, "unknown_share": 0.0}
        _, stats = judge_with_cache(judge, batch, POLICY, cache)
        assert stats["requests"] == 0 and stats["hits"] == 6
        assert srv.requests == 12


def test_unknowns_are_asked_again_up_to_the_attempt_bound_then_only_when_refreshed(tmp_path):
    batch = items(["a", "b [violates]", "c"])
    with FakeJudgeServer(shape="[sentence]") as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, max_unknown_attempts=3)

        def run(**kw):
            before = srv.requests
            verdicts, stats = judge_with_cache(judge, batch, POLICY, cache, **kw)
            assert srv.requests - before == stats["requests"]  # counted at the server
            return verdicts, stats

        for attempt in (1, 2, 3):
            verdicts, stats = run()
            assert stats["requests"] == 3 and stats["reasked"] == (0 if attempt == 1 else 3)
            # What a later run would ask again: none once the third unknown answer made them final.
            assert stats["unknown_retryable"] == (3 if attempt < 3 else 0)
            found = cache.get_verdict_attempts(POLICY.sha256, judge.identity, [item_key(it) for it in batch])
            assert sorted(n for _, n in found.values()) == [attempt] * 3
        # Unknown 3 times: final, served from the cache, its reason saying so.
        verdicts, stats = run()
        assert stats == {"hits": 3, "misses": 0, "requests": 0, "reasked": 0, "refreshed": 0, "unknown": 3, "unknown_retryable": 0}
        assert all(v.reason.endswith("(unknown after 3 attempts)") and "neither Yes nor No" in v.reason for v in verdicts)
        assert set(srv.counts.values()) == {3}
        # refresh_unknown (--fresh judge) asks exhausted unknowns again; the server is fixed now.
        srv.shape = None
        verdicts, stats = run(refresh_unknown=True)
        assert stats["requests"] == 3 and stats["reasked"] == 3 and stats["unknown"] == 0
        assert [v.compliant for v in verdicts] == [True, False, True]
        # Known verdicts stay paid for: refresh_unknown does not ask them, refresh_known does.
        _, stats = run(refresh_unknown=True)
        assert stats["requests"] == 0 and stats["hits"] == 3
        _, stats = run(refresh_known=True)
        assert stats["requests"] == 3 and stats["refreshed"] == 3 and stats["reasked"] == 0
        assert set(srv.counts.values()) == {5}


def test_attempt_bound_of_one_makes_unknowns_final_at_once_and_known_resets_the_count(tmp_path):
    batch = items(["a"])
    with FakeJudgeServer(shape="[think-open]") as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv)
        judge_with_cache(judge, batch, POLICY, cache, max_unknown_attempts=1)
        verdicts, stats = judge_with_cache(judge, batch, POLICY, cache, max_unknown_attempts=1)
        assert stats["requests"] == 0 and verdicts[0].reason.endswith("(unknown after 1 attempt)")
        srv.shape = None
        judge_with_cache(judge, batch, POLICY, cache, refresh_unknown=True)  # known now: attempts 1
        srv.shape = "[think-open]"
        judge_with_cache(judge, batch, POLICY, cache, refresh_known=True)  # unknown again: 1, not 3
        (_, attempts), = cache.get_verdict_attempts(POLICY.sha256, judge.identity, [item_key(batch[0])]).values()
        assert attempts == 1 and srv.requests == 3


def test_answer_token_is_located_after_the_reasoning_or_not_at_all():
    def steps(*tokens, answer_p=0.9):
        out = []
        for t in tokens:
            p = answer_p if t in ("No", "Yes") and "</think>" in "".join(tokens[: tokens.index(t)]) else 0.6
            out.append((t, math.log(p), [(t, math.log(p)), ("Yes" if t == "No" else "No", math.log(1 - p))]))
        return out

    think = steps("<think>", "Yes", "?", "</think>", "\n\n", "No")
    assert answer_token_top(think, "<think>Yes?</think>\n\nNo")[0] == ("No", pytest.approx(math.log(0.9)))
    # The server split the reasoning off and its tags were special tokens missing from the text:
    # "Yes" could be reasoning or answer, so no confidence rather than a wrong one.
    untagged = [(t, lp, top) for t, lp, top in think if t not in ("<think>", "</think>")]
    assert answer_token_top(untagged, "\n\nNo", reasoned=True) == []
    # Log-probs that cover the content alone still give it.
    content_only = [s for s in think if s[0] in ("\n\n", "No")]
    assert answer_token_top(content_only, "\n\nNo", reasoned=True)[0][0] == "No"
    assert answer_token_top(steps("<think>", "No"), "<think>No") == []  # open block: no answer token
    # Plain answers: the first token, as before; without alternatives its own logprob.
    assert answer_token_top([("Yes", -0.1, [])], "Yes") == [("Yes", -0.1)]


def test_verdict_from_answer_names_the_cut_and_reads_reasoning_only_when_content_is_empty():
    cut = verdict_from_answer("The", cut_at=1, setting="oracle")
    assert cut.compliant is None and "neither Yes nor No: 'The' (the answer was cut at max_answer_tokens=1)" in cut.reason
    # Content wins over the reasoning field; the reasoning's last line counts only without content.
    assert verdict_from_answer("No", reasoning="...\nYes").compliant is True
    assert verdict_from_answer(None, reasoning="Thinking.\n\n**Yes**\n").compliant is False
    assert verdict_from_answer("", reasoning="Yes.\nI am not sure").compliant is None
    assert verdict_from_answer(None, reasoning="...\nNo", cut_at=64, setting="evaluation.judge").reason == (
        "the answer was cut at max_answer_tokens=64 inside a reasoning block; raise evaluation.judge.max_answer_tokens"
    )


def test_content_parts_and_reasoning_parts():
    assert content_text([{"type": "text", "text": "No"}]) == ("No", "")
    mistral = [{"type": "thinking", "thinking": [{"type": "text", "text": "Yes?"}]}, {"type": "text", "text": "No"}]
    assert content_text(mistral) == ("No", "Yes?")
    assert content_text([{"type": "image_url", "image_url": {}}, "Yes"]) == ("Yes", "")
    with pytest.raises(TypeError):
        content_text({"text": "No"})


# -- chat templates without a system role (issue 10, item 7) ---------------------------------------


@pytest.mark.parametrize(
    "refusal", ["System role not supported", "Conversation roles must alternate user/assistant/user/assistant/..."]
)
def test_server_refusing_the_system_role_switches_to_the_user_placement_once(tmp_path, caplog, refusal):
    batch = items(["ok", "bad [violates]", "fine", "also fine"])
    with FakeJudgeServer(reject_system=refusal) as srv, VerdictCache(tmp_path / "v.db") as cache:
        judge = judge_for(srv, where="oracle", max_concurrency=2)
        system_identity = judge.identity
        with caplog.at_level("WARNING"):
            verdicts, stats = judge_with_cache(judge, batch, POLICY, cache)
            assert [v.compliant for v in verdicts] == [True, False, True, True]
            assert judge.placement == "user" and judge.identity != system_identity
            assert judge.identity == judge.identity_for("user")
            refused = sum(1 for _, _, status in srv.events if status == 400)
            assert 1 <= refused <= 2  # at most the requests in flight met the refusal
            asked = [b for b in srv.bodies if all(m["role"] == "user" for m in b["messages"])]
            assert len(asked) == 4 and srv.requests == 4 + refused
            first = asked[0]["messages"]
            assert len(first) == 1 and first[0]["content"].startswith(POLICY.text + "\n\nPrompt: ")
            # A new judge for the same server starts with the user placement: no refusal, and the
            # verdicts cached under the user identity are served.
            again = judge_for(srv, where="oracle")
            assert again.placement == "user"
            _, stats = judge_with_cache(again, batch, POLICY, cache)
            assert stats["hits"] == 4 and srv.requests == 4 + refused
            more = judge_with_cache(again, items(["new"], prefix="other"), POLICY, cache)[0]
            assert more[0].compliant is True and sum(1 for _, _, s in srv.events if s == 400) == refused
        said = [r for r in caplog.records if "refuses a system message" in r.getMessage()]
        assert len(said) == 1 and "oracle.policy_placement: user" in said[0].getMessage()


def test_system_placement_asked_for_explicitly_is_one_error_naming_the_setting():
    with FakeJudgeServer(reject_system="System role not supported") as srv:
        with pytest.raises(TraceError) as err:
            judge_for(srv, where="oracle", policy_placement="system").judge(items([f"r{i}" for i in range(20)]), POLICY)
    message = str(err.value)
    assert srv.url in message and "System role not supported" in message and "oracle.policy_placement: user" in message
    assert "\n" not in message and srv.requests <= 4


def test_user_placement_never_sends_a_system_message_and_has_its_own_identity(tmp_path):
    with FakeJudgeServer() as srv, VerdictCache(tmp_path / "v.db") as cache:
        system = judge_for(srv)
        user = judge_for(srv, policy_placement="user")
        # The default identity is the one caches were written under before the setting existed.
        assert system.identity == judge_for(srv, policy_placement="system").identity == "openai:fake-judge:aecac61287c7"
        assert system.correction_identity == "openai:fake-judge:6dff4f6020a9"
        assert user.identity != system.identity and user.correction_identity != system.correction_identity
        judge_with_cache(system, items(["a"]), POLICY, cache)
        _, stats = judge_with_cache(user, items(["a"]), POLICY, cache)
        assert stats["hits"] == 0 and stats["requests"] == 1  # not served the other placement's verdict
        assert [m["role"] for m in srv.bodies[-1]["messages"]] == ["user"]


def test_other_400s_do_not_switch_the_placement():
    with FakeJudgeServer(reject_system="This model's maximum context length is 8 tokens") as srv:
        judge = judge_for(srv, max_retries=0)
        verdicts = judge.judge(items(["a", "b"]), POLICY)
    assert judge.placement == "system"
    assert all(v.compliant is None and v.transient and "HTTP 400" in v.reason for v in verdicts)
