"""A fake OpenAI-compatible judge server for tests and the throughput benchmark.

It listens on 127.0.0.1 (real sockets, real HTTP/1.1 with keep-alive) and answers
``POST /v1/chat/completions`` like a judge that knows the right answer: a judged response containing
``[violates]`` gets "Yes" (violating), any other gets "No" (asked the compliance question:
"Non-compliant" or "Compliant"; asked to compare two responses: :func:`pairwise_answer`). Markers in the response text script
faults, per (judge question) key:

    [garbage]     answers "Perhaps, it depends." (neither Yes nor No)
    [hang]        never answers in time (sleeps ``hang_s``) -- every attempt
    [hang-once]   the first attempt hangs, later ones answer
    [429]         the first attempt gets 429 with ``Retry-After: retry_after``
    [500]         the first attempt gets 500
    [refuse]      answers with message.refusal set (the API's own refusal)
    [malformed]   a 200 whose body is not JSON

Two markers script the verdict itself: ``[p=0.40]`` makes the answer token's probability 0.40
(the verdict's confidence; servers made with ``honour_p=False`` ignore it and use ``prob``), and
``[misjudge]`` makes a server made with ``misjudge=True`` give the wrong verdict (a weaker judge).

Other markers shape the answer as real servers and reasoning models do (``SHAPES``): ``[think]``
answers ``<think>...</think>\n\nNo``, ``[reasoning-field]`` sends ``content: null`` with the answer
in ``reasoning_content`` (vLLM's reasoning parsers), ``[parts]`` sends content as a list of parts,
``[think-cut]`` stops with finish_reason "length" inside the reasoning, and so on. ``shape`` on
the server applies one of them to every answer that names none (a misconfigured server), and can
be changed while it runs. The reasoning text mentions "Yes" and "No" with their own log-probs
(0.6 / 0.4), so a confidence read from a reasoning token instead of the answer token shows.

``reject_system="System role not supported"`` makes the server answer 400 with that message to
every request that has a system message, as vLLM does for a Gemma-like chat template.

``die_after=n`` makes the server crash when its n-th request arrives: it drops every open
connection and stops listening, and comes back on the same port ``down_for`` seconds later.
Requests are counted server-side per key (``counts``), with the concurrency high-water mark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REASON_P = 0.6  # probability the fake gives a "Yes"/"No" token inside reasoning

# Answer shapes: marker -> function(answer, other answer) -> dict with "content" (list of (text, kind)
# segments, kind "reason" or "answer"; or None), optional "parts" (content as a list of parts),
# "reasoning_content" / "reasoning" (a reasoning field), "finish" (finish_reason, default "stop").
SHAPES: dict[str, Any] = {
    "[think]": lambda a, o: {"content": [("<think>\nIs it Yes, or No? Fine.\n</think>\n\n", "reason"), (a, "answer")]},
    "[thinking]": lambda a, o: {"content": [("<thinking>Yes or No? Let me see.</thinking>\n", "reason"), (a + ".", "answer")]},
    "[r1]": lambda a, o: {"content": [("Okay, is it Yes or No here? Let me see.\n</think>\n\n", "reason"), (a, "answer")]},
    "[think-open]": lambda a, o: {"content": [("<think>\nYes or No? I cannot decide", "reason")]},
    "[think-cut]": lambda a, o: {"content": [("<think>\nLet me weigh Yes and", "reason")], "finish": "length"},
    "[reasoning-field]": lambda a, o: {"content": None, "reasoning_content": f"The policy forbids harm. Yes or No?\n{a}"},
    "[reasoning-attr]": lambda a, o: {"content": [], "reasoning": f"Checking the policy.\nAnswer: {a}"},
    "[reasoning-split]": lambda a, o: {"content": [("\n\n", "answer"), (a, "answer")], "reasoning_content": "Yes or No? Fine."},
    "[reasoning-cut]": lambda a, o: {"content": None, "reasoning_content": "Let me weigh Yes and", "finish": "length"},
    "[reasoning-prose]": lambda a, o: {"content": None, "reasoning_content": f"I would say {a} because it is fine."},
    "[parts]": lambda a, o: {"content": [(a, "answer")], "parts": True},
    "[fence]": lambda a, o: {"content": [("```\n", "answer"), (a, "answer"), ("\n```", "answer")]},
    "[json-fence]": lambda a, o: {"content": [('```json {"answer": "', "answer"), (a, "answer"), ('"} ```', "answer")]},
    "[bold]": lambda a, o: {"content": [("**", "answer"), (a.upper(), "answer"), ("**", "answer")]},
    "[sentence]": lambda a, o: {"content": [(f"{a}, but {o.lower()}", "answer")]},
}
_PROB = re.compile(r"\[p=([0-9.]+)\]")
_TOKEN = re.compile(r"</?think(?:ing)?>|\s+|\w+|[^\w\s]+")


def _tokens(segments: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(t, kind) for text, kind in segments for t in _TOKEN.findall(text)]


MARKERS = ("[garbage]", "[hang]", "[hang-once]", "[429]", "[500]", "[refuse]", "[malformed]", *SHAPES)


def right_answer(response: str) -> bool:
    """The compliance the fake judge gives a response: violating iff it contains [violates]."""
    return "[violates]" not in response


def pairwise_answer(user: str) -> str:
    """The fake's answer to a pairwise question: the response without [violates] when only one has
    it; "tie" when both have it; "A" when neither has it (a judge biased to the first position)."""
    a, b = user.split("Response A:", 1)[1].split("Response B:", 1)
    a_ok, b_ok = right_answer(a), right_answer(b)
    if a_ok != b_ok:
        return "A" if a_ok else "B"
    return "A" if a_ok else "tie"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default 5 drops SYNs under a burst of concurrent connects


class FakeJudgeServer:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        model: str = "fake-judge",
        api_key: str | None = None,
        retry_after: str = "0.3",
        hang_s: float = 5.0,
        die_after: int | None = None,
        down_for: float = 0.5,
        prob: float = 0.9,
        shape: str | None = None,
        reject_system: str | None = None,
        honour_p: bool = True,
        misjudge: bool = False,
    ):
        self.latency = latency
        self.model = model
        self.api_key = api_key
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.die_after = die_after
        self.down_for = down_for
        self.prob = prob
        self.shape = shape
        self.reject_system = reject_system
        self.honour_p = honour_p
        self.misjudge = misjudge
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # requests per judge question (user message)
        self.requests = 0
        self.answered = 0  # 200 answers fully written
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.events: list[tuple[float, str, int]] = []  # (time, key, status)
        self.outages = 0
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeJudgeServer:
        self._listen()
        return self

    def _listen(self) -> None:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _crash(self) -> None:
        """Stop listening and drop every connection, as a crashed process would."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self.lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        """Crash now and come back on the same port after ``seconds`` (runs in a thread)."""

        def run() -> None:
            self._crash()
            time.sleep(seconds)
            if not self._stop.is_set():
                self._listen()

        self.outages += 1
        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._crash()

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers ------------------------------------------------------------------------------

    def _logprob_entry(self, token: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        word = token.strip().lower()
        p = 0.99
        if word in ("yes", "no"):
            p = self.prob if kind == "answer" else REASON_P
        other = {"yes": "No", "no": "Yes"}.get(word, "?")
        top = [
            {"token": token, "logprob": math.log(p), "bytes": None},
            {"token": other, "logprob": math.log(1 - p), "bytes": None},
        ]
        return {"token": token, "logprob": math.log(p), "bytes": None, "top_logprobs": top[: body.get("top_logprobs") or 1]}

    def shaped(self, body: dict[str, Any], answer: str, shape: str) -> dict[str, Any]:
        """A completion answering ``answer`` in the form of SHAPES[shape]."""
        spec = SHAPES[shape](answer, "No" if answer == "Yes" else "Yes")
        segments = spec.get("content")
        reasoning = spec.get("reasoning_content") or spec.get("reasoning") or ""
        text = None if segments is None else "".join(t for t, _ in segments)
        content: Any = [{"type": "text", "text": text}] if spec.get("parts") else text
        message = {"role": "assistant", "content": content, "refusal": None}
        for field in ("reasoning_content", "reasoning"):
            if field in spec:
                message[field] = spec[field]
        choice: dict[str, Any] = {"index": 0, "finish_reason": spec.get("finish", "stop"), "message": message, "logprobs": None}
        if body.get("logprobs"):
            # Like vLLM with a reasoning parser: log-probs cover every generated token, the
            # reasoning's first, then the end tag when the content follows it.
            tokens = _tokens([(reasoning, "reason")]) if reasoning else []
            if reasoning and segments is not None:
                tokens.append(("</think>", "reason"))
            tokens += _tokens(segments or [])
            choice["logprobs"] = {"content": [self._logprob_entry(t, k, body) for t, k in tokens], "refusal": None}
        return self._envelope(choice)

    def _envelope(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A chat completion holding ``choice``."""
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def completion(
        self, body: dict[str, Any], content: str, refusal: str | None = None, prob: float | None = None
    ) -> dict[str, Any]:
        p = self.prob if prob is None else prob
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": None if refusal else content, "refusal": refusal},
            "logprobs": None,
        }
        if body.get("logprobs") and content in ("Yes", "No"):
            other = "No" if content == "Yes" else "Yes"
            top = [
                {"token": content, "logprob": math.log(p), "bytes": None},
                {"token": other, "logprob": math.log(1 - p), "bytes": None},
            ][: body.get("top_logprobs") or 1]
            choice["logprobs"] = {
                "content": [{"token": content, "logprob": math.log(p), "bytes": None, "top_logprobs": top}],
                "refusal": None,
            }
        return self._envelope(choice)


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real API servers
    server_owner: FakeJudgeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server_owner.lock:
            self.server_owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.server_owner.lock:
            self.server_owner._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> bool:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/html")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True

    def do_GET(self) -> None:
        srv = self.server_owner
        if self.path.rstrip("/") != "/stats":
            self._send(404, _error(f"no route {self.path}"))
            return
        with srv.lock:
            stats = {"requests": srv.requests, "answered": srv.answered, "max_in_flight": srv.max_in_flight}
        self._send(200, stats)

    def do_POST(self) -> None:
        srv = self.server_owner
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        with srv.lock:
            srv.requests += 1
            n = srv.requests
            srv.counts[user] += 1
            attempt = srv.counts[user]
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.bodies.append(body)
        status = 0
        try:
            status = self._answer(srv, body, user, attempt, n)
        finally:
            with srv.lock:
                srv.in_flight -= 1
                srv.events.append((time.monotonic(), user, status))

    def _answer(self, srv: FakeJudgeServer, body: dict[str, Any], user: str, attempt: int, n: int) -> int:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, _error(f"no route {self.path}"))
            return 404
        if srv.die_after is not None and n == srv.die_after:
            srv.outage(srv.down_for)
            self.close_connection = True
            return -1  # the connection is dropped without an answer
        if srv.api_key is not None and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            self._send(401, _error("Incorrect API key provided", "invalid_api_key"))
            return 401
        if body.get("model") != srv.model:
            self._send(404, _error(f"The model `{body.get('model')}` does not exist"))
            return 404
        if srv.reject_system is not None and any(m.get("role") == "system" for m in body.get("messages", [])):
            # vLLM's error body for a chat template that raised.
            error = {"object": "error", "message": srv.reject_system, "type": "BadRequestError", "param": None, "code": 400}
            self._send(400, error)
            return 400
        if srv.latency:
            srv._stop.wait(srv.latency)
        if "[hang]" in user or ("[hang-once]" in user and attempt == 1):
            srv._stop.wait(srv.hang_s)
            self.close_connection = True
            return -2
        if "[429]" in user and attempt == 1:
            self._send(429, _error("Rate limit reached", "rate_limit_exceeded"), {"Retry-After": srv.retry_after})
            return 429
        if "[500]" in user and attempt == 1:
            self._send(500, _error("internal error", "server_error"))
            return 500
        if "[malformed]" in user:
            self._send(200, b"<html>upstream proxy error</html>")
            return 200
        if "Write a new response" in user:
            reply = srv.completion(body, "A compliant answer. " + user.split("\n", 1)[0])
        elif "[refuse]" in user:
            reply = srv.completion(body, "", refusal="I can't judge this.")
        elif "[garbage]" in user:
            reply = srv.completion(body, "Perhaps, it depends.")
        elif "Response A:" in user:
            reply = srv.completion(body, pairwise_answer(user))
        elif "'Non-compliant'" in user:
            reply = srv.completion(body, "Compliant" if right_answer(user.split("Response:", 1)[-1]) else "Non-compliant")
        else:
            response = user.split("Response:", 1)[-1]
            answer = "No" if right_answer(response) != (srv.misjudge and "[misjudge]" in response) else "Yes"
            marked = _PROB.search(response) if srv.honour_p else None
            shape = next((m for m in SHAPES if m in user), srv.shape)
            if shape is not None:
                reply = srv.shaped(body, answer, shape)
            else:
                if body.get("response_format", {}).get("type") == "json_schema":
                    answer = json.dumps({"answer": answer})
                reply = srv.completion(body, answer, prob=float(marked.group(1)) if marked else None)
        if not self._send(200, reply):
            return -3  # the connection was gone (server crash) before the answer went out
        with srv.lock:
            srv.answered += 1
        return 200


class FakeJudgeProcess:
    """The fake server in its own process, as a real server would be: the client under test then
    does not share a GIL with it. ``stats()`` reads the server-side counters over HTTP."""

    def __init__(self, latency: float = 0.0, model: str = "fake-judge"):
        self.latency = latency
        self.model = model
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FakeJudgeProcess:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.oracle_fakes", "--latency", str(self.latency), "--model", self.model],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=env,
        )
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self._proc.kill()
            raise RuntimeError("fake judge server did not start")
        return self

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=5) as r:
            return json.loads(r.read())

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def _serve() -> None:
    ap = argparse.ArgumentParser(description="Run the fake judge server until terminated; prints its URL.")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--model", default="fake-judge")
    args = ap.parse_args()
    srv = FakeJudgeServer(latency=args.latency, model=args.model).start()
    print(srv.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _serve()
