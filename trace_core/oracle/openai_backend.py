"""The openai judge: any OpenAI-compatible chat endpoint (OpenAI, ``vllm serve``, ``transformers serve``).

Requests run on one asyncio loop with at most ``max_concurrency`` in flight (that many workers
pull from a shared queue, so a slow request never holds back the others). Each answer is handed
to ``on_result`` as soon as it arrives, which lets the verdict cache commit it before the batch ends.

Failures, and what becomes of them:

* 429, 408, 409, 5xx, timeouts and connection errors are retried up to ``max_retries`` times. The
  wait is the server's ``Retry-After`` / ``retry-after-ms`` when given, else ``retry_backoff_s``
  doubled per attempt with jitter; every wait is capped at ``max_retry_wait_s``. The client's own
  retries are off so that one policy, with its counts, applies. After the last retry the item gets
  an unknown verdict marked transient (not cached: a rerun asks again).
* Other 4xx (the server rejected this request: too long, refused by a content filter) give an
  unknown verdict, also transient: such errors usually come from the server or the settings, and a
  rerun after fixing them should ask again rather than replay a cached failure.
* A completion whose text is not Yes/No (or fails the JSON schema) is an answer: unknown with the
  reason, cached with its attempt count; the verdict cache asks it again on later runs up to
  ``max_unknown_attempts`` times (see ``cache``).
* A 400/422 saying the chat template refuses a system message ("System role not supported",
  "Conversation roles must alternate"): with ``policy_placement: auto`` the judge switches to the
  user placement once (said once in the log, remembered for this server and model for the rest of
  the process) and asks those requests again; with ``system`` it is one TraceError naming the
  setting.
* Problems that affect every request end the run with one TraceError naming the URL: 401/403 (the
  key), 404 (model or endpoint), a connection error before any request has succeeded (unreachable
  base URL), and ``max_consecutive_failures`` failed requests in a row (the server went away).
  Answers already received were handed to ``on_result`` and stay cached.

Answers are read as :func:`~trace_realign.core.oracle.base.verdict_from_answer` describes: the final answer
after a reasoning block, content given as a list of parts, and (when the content is empty) a
reasoning field (``reasoning_content`` / ``reasoning``, as vLLM's reasoning parsers return) that
ends with a Yes or No line.

The API key is read from the environment variable ``api_key_env`` names; it is kept only inside the
client, and scrubbed from any server message quoted in an error.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx2
import openai

from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.oracle.base import (
    PAIRWISE,
    VIOLATION,
    Comparison,
    ComparisonItem,
    JudgeItem,
    LLMJudge,
    OnResult,
    Question,
    Verdict,
    answer_token_top,
    clip,
    comparison_from_answer,
    split_reasoning,
    verdict_from_answer,
    warn_once,
)
from trace_realign.core.oracle.config import OpenAIJudgeConfig
from trace_realign.core.policy import Policy

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_STATUS = {408, 409, 425, 429}
# What servers say when the chat template refuses a system message (vLLM, TGI, transformers serve
# quote the template's raise_exception text: Gemma's, Mistral's and Llama 2's).
_SYSTEM_REFUSAL = re.compile(
    r"system[ _-]?(role|message|prompt)s?\b[^.]{0,40}?\bnot (supported|allowed|permitted)"
    r"|roles must alternate|(does not|doesn't) support (a |the )?system",
    re.IGNORECASE,
)
# (base_url, model) pairs whose server refused a system message in this process: later judges for
# them start with the user placement ("auto"), so a run switches once, not once per shard.
_SYSTEM_REFUSED: set[tuple[str, str]] = set()
_SYSTEM_REFUSED_LOCK = threading.Lock()
def json_schema(question: Question) -> dict[str, Any]:
    """The ``response_format`` asking for ``{"answer": <one of the question's answers>}``."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "verdict" if question is not PAIRWISE else "comparison",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "string", "enum": list(question.answers)}},
                "required": ["answer"],
                "additionalProperties": False,
            },
        },
    }


def run_coroutine(make: Callable[[], Any]) -> Any:
    """Run the coroutine ``make()`` to completion from synchronous code.

    Inside an already running event loop (a notebook), asyncio.run is not allowed, so the
    coroutine runs on a fresh loop in a helper thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def retry_wait(
    attempt: int,
    headers: Mapping[str, str] | None,
    base_s: float,
    cap_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt + 1``.

    The server's ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date) when present,
    else ``base_s * 2**attempt`` scaled by a random factor in [0.5, 1) so that requests which
    failed together do not retry together; always capped at ``cap_s``.
    """
    if headers:
        lowered = {k.lower(): v for k, v in headers.items()}
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            value = lowered.get(name)
            if value is None:
                continue
            try:
                return max(0.0, min(cap_s, float(value) * scale))
            except ValueError:
                pass
            when = email.utils.parsedate_tz(value)
            if when is not None:
                return max(0.0, min(cap_s, email.utils.mktime_tz(when) - time.time()))
    return min(cap_s, base_s * (2**attempt) * (0.5 + rng() / 2))


class _Breaker:
    """Turns failures that affect every request into one TraceError instead of many unknowns."""

    def __init__(self, url: str, limit: int):
        self.url = url
        self.limit = limit
        self.successes = 0
        self.failures_in_a_row = 0

    def success(self) -> None:
        self.successes += 1
        self.failures_in_a_row = 0

    def failure(self, exc: BaseException, what: str) -> None:
        self.failures_in_a_row += 1
        unreachable = isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError)
        if unreachable and self.successes == 0:
            raise TraceError(f"cannot reach the judge at {self.url}: {what}")
        if self.failures_in_a_row >= self.limit:
            raise TraceError(
                f"judge at {self.url}: {self.failures_in_a_row} requests in a row failed (last: {what}); "
                f"{self.successes} answers were received and kept; rerun to ask the rest"
            )


class OpenAIJudge(LLMJudge):
    """Judge through an OpenAI-compatible chat completions endpoint."""

    backend = "openai"
    config: OpenAIJudgeConfig

    def __init__(self, config: OpenAIJudgeConfig, where: str = "judge", question: str = "violation"):
        super().__init__(config, where, question)
        self._api_key = self._read_api_key(config.api_key_env, where)
        self.requests_sent = 0  # HTTP requests, retries included, over this judge's lifetime
        if config.policy_placement == "auto":
            with _SYSTEM_REFUSED_LOCK:
                if (config.base_url, config.model) in _SYSTEM_REFUSED:
                    self.templates.placement = "user"

    @staticmethod
    def _read_api_key(env: str | None, where: str = "judge") -> str:
        if env is None:
            # Local servers without auth still need a non-empty bearer value for the client.
            return "EMPTY"
        key = os.environ.get(env)
        if not key:
            raise ConfigError(
                f"{where}.api_key_env: environment variable {env} is not set (it should hold the API key); "
                f"for a local server without auth set {where}.api_key_env: null"
            )
        return key

    @property
    def model_name(self) -> str:
        return self.config.model

    def answer_settings(self) -> dict[str, Any]:
        c = self.config
        return {"answer": c.structured_output if c.use_structured_output else "text", "max_answer_tokens": c.max_answer_tokens}

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.identity}, base_url={self.config.base_url!r})"

    def _other_placement(self) -> tuple[str, ...]:
        if self.config.policy_placement != "auto":
            return ()
        return ("user",) if self.placement == "system" else ("system",)

    @property
    def cache_identities(self) -> tuple[str, ...]:
        """With "auto" the placement is learnt from the server, so verdicts cached under either
        placement are this judge's answers: a run after the switch does not ask them again."""
        return (self.identity, *(self.identity_for(p) for p in self._other_placement()))

    @property
    def correction_cache_identities(self) -> tuple[str, ...]:
        return (self.correction_identity, *(self.correction_identity_for(p) for p in self._other_placement()))

    # -- request parameters -------------------------------------------------------------------

    def _judge_params(self, question: Question | None = None) -> dict[str, Any]:
        """Request parameters for an answer to ``question`` (default: the judge's verdict question):
        at least the question's own ``max_tokens`` ("Non-compliant" takes several)."""
        c = self.config
        question = question or self.question
        params: dict[str, Any] = {"model": c.model, "max_tokens": max(c.max_answer_tokens, question.max_tokens), "temperature": 0.0}
        if c.logprobs:
            params.update(logprobs=True, top_logprobs=c.top_logprobs)
        if c.use_structured_output and c.structured_output == "choice":
            # vLLM's extension, a top-level body field (what extra_body would add).
            params["structured_outputs"] = {"choice": list(question.answers)}
        elif c.use_structured_output:
            params["response_format"] = json_schema(question)
            # {"answer": "Yes"} takes several tokens.
            params["max_tokens"] = max(params["max_tokens"], 16)
        return params

    def _correction_params(self) -> dict[str, Any]:
        c = self.config
        params: dict[str, Any] = {"model": c.model, "max_tokens": c.max_correction_tokens, "temperature": c.temperature}
        if c.seed is not None:
            params["seed"] = c.seed
        return params

    # -- answers ------------------------------------------------------------------------------

    def _read(self, completion: dict[str, Any], question: Question, read: Callable[..., T], unknown: Callable[..., T]) -> T:
        """``read(text, top, reasoning=, cut_at=, setting=)`` of a completion answering ``question``, or
        ``unknown(reason, raw=)`` when the API refused or filtered the answer."""
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        if message.get("refusal"):
            return unknown(f"the judge refused: {message['refusal']}", raw=str(message["refusal"]))
        text, part_reasoning = content_text(message.get("content"))
        # vLLM's reasoning parsers: reasoning_content (older), reasoning (newer; some versions send both).
        reasoning = _string(message.get("reasoning_content")) or _string(message.get("reasoning")) or part_reasoning
        if choice.get("finish_reason") == "content_filter":
            return unknown("the API's content filter stopped the answer", raw=text)
        cut_at = self._judge_params(question)["max_tokens"] if choice.get("finish_reason") == "length" else None
        top = _answer_top_logprobs(choice.get("logprobs"), text, bool(reasoning.strip()), question)
        return read(text, top, reasoning=reasoning, cut_at=cut_at, setting=self.where)

    def _verdict(self, completion: dict[str, Any]) -> Verdict:
        question = self.question
        return self._read(completion, question, lambda *a, **k: verdict_from_answer(*a, question=question, **k), Verdict.unknown)

    def _comparison(self, completion: dict[str, Any]) -> Comparison:
        return self._read(completion, PAIRWISE, comparison_from_answer, Comparison.unknown)

    @staticmethod
    def _correction(completion: dict[str, Any]) -> str | None:
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            return None
        text, _ = content_text(message.get("content"))
        answer, _ = split_reasoning(text)  # a reasoning model's rewrite follows its reasoning
        return (answer or "").strip() or None

    # -- public API ---------------------------------------------------------------------------

    def judge(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[Verdict]:
        """One verdict per item, asked concurrently; ``on_result`` sees each as it arrives."""
        return self._run(
            items,
            lambda item: self.templates.judge_messages(item, policy),
            self._judge_params(),
            self._verdict,
            lambda reason: Verdict.unknown(reason, transient=True),
            on_result,
        )

    def compare(self, items: Sequence[ComparisonItem], policy: Policy, on_result: OnResult | None = None) -> list[Comparison]:
        """"A", "B" or "tie" per item (``pairwise_template``, temperature 0), asked concurrently;
        failed requests are transient unknowns."""
        return self._run(
            items,
            lambda item: self.templates.comparison_messages(item, policy),
            self._judge_params(PAIRWISE),
            self._comparison,
            lambda reason: Comparison.unknown(reason, transient=True),
            on_result,
        )

    def correct(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[str | None]:
        """A compliant rewrite per item (sampled at ``temperature``); None where the request failed."""
        return self._run(
            items,
            lambda item: self.templates.correction_messages(item, policy),
            self._correction_params(),
            self._correction,
            lambda reason: None,
            on_result,
        )

    # -- machinery ----------------------------------------------------------------------------

    def _run(
        self,
        items: Sequence[JudgeItem],
        chat: Callable[[JudgeItem], list[dict[str, str]]],
        params: dict[str, Any],
        read: Callable[[Any], T],
        failed: Callable[[str], T],
        on_result: OnResult | None,
    ) -> list[T]:
        """``chat(item)`` renders an item's messages; it is called per attempt, so a request asked
        again after a placement switch is rendered with the new placement."""
        if not items:
            return []
        results: dict[int, T] = run_coroutine(lambda: self._run_async(items, chat, params, read, failed, on_result))
        return [results[i] for i in range(len(items))]

    async def _run_async(self, items, chat, params, read, failed, on_result) -> dict[int, Any]:
        c = self.config
        limit = c.max_consecutive_failures or max(8, 2 * c.max_concurrency)
        breaker = _Breaker(c.base_url, limit)
        results: dict[int, Any] = {}
        pending = iter(enumerate(items))  # shared by the workers; safe on one event loop

        client = openai.AsyncOpenAI(api_key=self._api_key, base_url=c.base_url, max_retries=0, timeout=c.timeout_s)

        async def worker() -> None:
            for index, item in pending:
                value = await self._request(client, lambda: chat(item), params, read, failed, breaker)
                results[index] = value
                if on_result is not None:
                    on_result(index, value)

        try:
            async with client:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(c.max_concurrency, len(items))):
                        group.create_task(worker())
        except BaseExceptionGroup as group_error:
            # A fatal TraceError in one worker cancels the others; report it, not the group.
            fatal = [e for e in group_error.exceptions if isinstance(e, TraceError)]
            if fatal:
                raise fatal[0] from None
            raise
        return results

    async def _request(self, client, render, params, read, failed, breaker: _Breaker):
        c = self.config
        attempt = 0
        while True:
            placement = self.placement
            messages = render()
            self.requests_sent += 1
            try:
                # The client's documented raw-endpoint call: same auth, timeout and error types as
                # chat.completions.create, without its per-request parameter transform and typed
                # response models, which cost ~1.5 ms of CPU per request and capped throughput at
                # high concurrency. The completion is read as plain JSON.
                response = await client.post("/chat/completions", body={"messages": messages, **params}, cast_to=httpx2.Response)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise TraceError(
                    f"judge at {c.base_url} rejected the credentials (HTTP {exc.status_code}) "
                    f"from ${c.api_key_env}: {self._scrub(exc)}"
                ) from None
            except openai.NotFoundError as exc:
                raise TraceError(
                    f"judge at {c.base_url}: model {c.model!r} or the chat endpoint was not found (HTTP 404): {self._scrub(exc)}"
                ) from None
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                status = getattr(exc, "status_code", None)
                if placement == "system" and status in (400, 422) and _SYSTEM_REFUSAL.search(str(exc)):
                    self._system_refused(exc)  # raises, or switches to the user placement
                    continue
                retryable = status is None or status in _RETRY_STATUS or status >= 500
                what = self._describe(exc, attempt + 1)
                if retryable and attempt < c.max_retries:
                    headers = exc.response.headers if isinstance(exc, openai.APIStatusError) else None
                    wait = retry_wait(attempt, headers, c.retry_backoff_s, c.max_retry_wait_s)
                    log.debug("judge request failed (%s); retrying in %.2fs", what, wait)
                    attempt += 1
                    await asyncio.sleep(wait)
                    continue
                breaker.failure(exc, what)
                return failed(what)
            try:
                value = read(response.json())
            except (AttributeError, IndexError, TypeError, KeyError, ValueError) as exc:
                # A 2xx whose body is not a chat completion (a proxy's error page, truncated JSON).
                what = f"malformed response from the server ({type(exc).__name__}: {clip(response.text)!r})"
                breaker.failure(exc, what)
                return failed(what)
            if self.placement != placement:
                # The placement switched while this request was in flight: ask again, so that every
                # answer handed over was asked under the placement the judge's identity names.
                continue
            breaker.success()
            return value

    def _system_refused(self, exc: openai.APIStatusError) -> None:
        """The server's chat template refused a system message: a TraceError with placement
        "system"; with "auto", switch to the user placement (once, said once in the log)."""
        c = self.config
        what = f"HTTP {exc.status_code}: {self._scrub(exc)}"
        if c.policy_placement == "system":
            raise TraceError(
                f"judge at {c.base_url}: model {c.model!r} refuses a system message ({what}); "
                f"set {self.where}.policy_placement: user (or auto) to put the policy in the user message"
            )
        if self.placement == "system":
            self.templates.placement = "user"
            with _SYSTEM_REFUSED_LOCK:
                _SYSTEM_REFUSED.add((c.base_url, c.model))
            warn_once(
                f"placement:{c.base_url}:{c.model}",
                "judge at %s: model %r refuses a system message (%s); the policy goes at the start of the user "
                "message from now on (%s.policy_placement: user)",
                c.base_url,
                c.model,
                what,
                self.where,
            )

    def _describe(self, exc: BaseException, attempts: int) -> str:
        c = self.config
        if isinstance(exc, openai.APITimeoutError):
            return f"timed out after {attempts} attempt(s) of {c.timeout_s:g}s"
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return f"connection failed after {attempts} attempt(s): {self._scrub(cause)}"
        return f"HTTP {getattr(exc, 'status_code', '?')} after {attempts} attempt(s): {self._scrub(exc)}"

    def _scrub(self, exc: BaseException) -> str:
        """The error's message, one line, clipped, with the API key (if a server echoed it) masked."""
        text = " ".join(str(exc).split())
        if self._api_key and self._api_key != "EMPTY":
            text = text.replace(self._api_key, "***")
        return text[:300] or type(exc).__name__


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def content_text(content: Any) -> tuple[str, str]:
    """(text, reasoning) of a chat message's ``content``: a string, None, or a list of parts.

    Parts of type "text" / "output_text" (or bare strings) make the text; parts of type "thinking" /
    "reasoning" (Mistral's reasoning models) the reasoning. Other parts are ignored. A content of
    any other shape is a TypeError (read as a malformed response).
    """
    if content is None:
        return "", ""
    if isinstance(content, str):
        return content, ""
    if not isinstance(content, list):
        raise TypeError(f"message content is a {type(content).__name__}")
    text: list[str] = []
    reasoning: list[str] = []
    for part in content:
        if isinstance(part, str):
            text.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "output_text"):
            text.append(_string(part.get("text")))
        elif isinstance(part, dict) and part.get("type") in ("thinking", "reasoning"):
            inner = next((part[k] for k in ("thinking", "reasoning", "text") if k in part), "")
            reasoning.append(content_text(inner)[0] if isinstance(inner, list) else _string(inner))
    return "".join(text), "\n".join(r for r in reasoning if r)


def _answer_top_logprobs(
    logprobs: dict[str, Any] | None, text: str = "", reasoned: bool = False, question: Question = VIOLATION
) -> list[tuple[str, float]]:
    """(token, logprob) candidates for the answer token of a chat completion's ``logprobs``: the
    first generated token that starts an answer to ``question`` (default: Yes or No) after any reasoning block (the first token in
    plain mode, later ones inside JSON or after ``</think>``); see
    :func:`~trace_realign.core.oracle.base.answer_token_top`."""
    steps = [
        (
            entry.get("token") or "",
            entry.get("logprob"),
            [(t.get("token") or "", t.get("logprob")) for t in entry.get("top_logprobs") or []],
        )
        for entry in (logprobs or {}).get("content") or []
    ]
    return answer_token_top(steps, text, reasoned, question)
