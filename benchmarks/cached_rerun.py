"""Benchmark: how fast ``trace-realign run`` answers when every stage is cached, from the CLI.

Measures, each as a user runs it (a fresh process per command, in one fresh working folder, with
a temporary ``TRACE_REALIGN_HOME`` so the user's own server and models are left alone):

1. the first run of ``--config`` (default ``configs/smoke.yaml``) and its fully cached rerun on
   Prefect's temporary local server (the default: no server configured);
2. ``trace-realign server start`` (once), then a first run in a second working folder and its
   fully cached rerun, both on that server; then ``trace-realign server stop``.

Each rerun is checked to have answered every stage from the cache. The cached rerun's own process
imports no torch, transformers or MLflow flavor (the stages that would load them do not run).

Targets (issue 14): the cached rerun in at most 3 s (goal) and 5 s (bar) with a running server, and
``cached_rerun_ratio=<cached rerun on the server / first run on the server>`` under 0.1 (the last line).

    .venv/bin/python benchmarks/cached_rerun.py [--config configs/smoke.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import ROOT, Stopwatch, fresh_folder, print_metric, run_checked


def cli(args: list[str], env: dict, what: str) -> float:
    """Seconds of one ``trace-realign`` command in a fresh process (exits on failure)."""
    with Stopwatch() as wall:
        run_checked([sys.executable, "-m", "trace_realign.flows.cli", *args], what, cwd=ROOT, env=env)
    return wall.seconds


def all_cached(workdir: Path) -> bool:
    last = json.loads((workdir / "runs" / "last.json").read_text())
    stages = json.loads(Path(last["manifest"]).read_text())["stages"]
    return bool(stages) and all(info["cached"] for info in stages.values())


def measure(config: str, workdir: Path, env: dict, repeats: int, label: str) -> tuple[float, float]:
    run = ["run", "--config", config, "--no-progress", "--set", f"run.workdir={workdir}"]
    first = cli(run, env, f"first run ({label})")
    reruns = []
    for _ in range(repeats):
        reruns.append(cli(run, env, f"cached rerun ({label})"))
        if not all_cached(workdir):
            raise SystemExit(f"the rerun ({label}) was not fully cached: see {workdir}/runs/last.json")
    print(f"{label:<18} first run {first:6.2f} s, cached reruns {', '.join(f'{s:.2f}' for s in reruns)} s", flush=True)
    return first, min(reruns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="cached reruns per setting; the fastest counts")
    args = ap.parse_args()
    tmp = fresh_folder("trace-cached-rerun-")
    env = {**os.environ, "TRACE_REALIGN_HOME": str(tmp / "home")}
    env.pop("PREFECT_API_URL", None)

    first_tmp, rerun_tmp = measure(args.config, tmp / "work-temporary", env, args.repeats, "temporary server")
    start = cli(["server", "start"], env, "trace-realign server start")
    try:
        first_srv, rerun_srv = measure(args.config, tmp / "work-server", env, args.repeats, "started server")
    finally:
        cli(["server", "stop"], env, "trace-realign server stop")
    print(f"trace-realign server start: {start:.2f} s (once)")
    print_metric("cached_rerun_temporary_server_s", rerun_tmp)
    print_metric("cached_rerun_ratio_temporary_server", rerun_tmp / first_tmp)
    print_metric("cached_rerun_s", rerun_srv)
    print_metric("cached_rerun_ratio", rerun_srv / first_srv)


if __name__ == "__main__":
    main()
