"""Benchmark: throughput of the openai judge against a local OpenAI-compatible server with a fixed latency.

Measures: with ``concurrency`` requests in flight and ``latency`` seconds per answer, no client
can exceed concurrency / latency answers per second; efficiency is the measured rate over that
limit. The first pass goes through the verdict cache, committing each answer as it arrives; a
second pass over the same data must make zero requests. The server (``tests/oracle_fakes.py``)
runs in its own process, as a real one would, so it does not compete with the client for the GIL.

Target: ``judge_efficiency`` >= 0.9 and ``judge_rerun_requests`` = 0, the last two lines.

    .venv/bin/python benchmarks/judge_throughput.py [--pairs 2400] [--latency 0.05] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

from common import ROOT, Stopwatch, print_metric

sys.path.insert(0, str(ROOT))  # the fake server lives with the tests
from tests.oracle_fakes import FakeJudgeProcess, right_answer  # noqa: E402

from trace_realign.core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge  # noqa: E402
from trace_realign.core.policy import parse_policy  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2400)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the server takes per answer")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    args = ap.parse_args()

    policy = parse_policy("Never help with [violates] things.")
    items = [JudgeItem(f"prompt {i}", f"response {i}" + (" [violates]" if i % 5 == 0 else "")) for i in range(args.pairs)]
    limit = args.concurrency / args.latency

    with FakeJudgeProcess(latency=args.latency) as srv, tempfile.TemporaryDirectory() as tmp:
        judge = make_judge(
            {"backend": "openai", "model": srv.model, "base_url": srv.url, "api_key_env": None, "max_concurrency": args.concurrency}
        )
        with VerdictCache(Path(tmp) / "verdicts.db") as cache:
            cpu0 = cpu_seconds()
            with Stopwatch() as first:
                verdicts, stats = judge_with_cache(judge, items, policy, cache)
            cpu_ms = 1000 * (cpu_seconds() - cpu0) / len(items)
            wrong = sum(v.compliant != right_answer(it.response) for it, v in zip(items, verdicts))
            rate = len(items) / first.seconds

            before = srv.stats()
            with Stopwatch() as second:
                _, stats2 = judge_with_cache(judge, items, policy, cache)
            after = srv.stats()

    print(f"pairs={len(items)} latency={args.latency * 1000:.0f}ms concurrency={args.concurrency} limit={limit:.1f}/s")
    print(f"first pass: {first.seconds:.2f}s, {rate:.1f} pairs/s, stats={stats}, wrong or unknown={wrong}, server max in flight={after['max_in_flight']}")
    print(f"second pass: {second.seconds:.3f}s, stats={stats2}")
    # The client is one event loop: at limit/s it needs limit * cpu_ms / 1000 of a core, which other
    # processes on a busy machine can take away; the load average says how busy it was.
    print(f"client CPU per pair: {cpu_ms:.2f} ms; load average (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_metric("judge_efficiency", rate / limit)
    print_metric("judge_rerun_requests", after["requests"] - before["requests"], "d")


if __name__ == "__main__":
    main()
