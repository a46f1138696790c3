"""Benchmark: how long ``trace-realign watch`` takes to stop on Ctrl-C, against its own bound.

Measures: ``watch`` started on configs/smoke.yaml (the tiny model, each triggered realign run
stopping after ``load``) with the Prefect server it starts itself, in a fresh working folder, then
sent SIGINT; the seconds from the first SIGINT to exit, per case:

- idle: a minute-long interval, stopped a second after it serves;
- ticking: a 2-second interval, stopped while ticks run;
- realigning: a 2-second interval, the policy edited, stopped while the realign run it started runs;
- twice: two Ctrl-C a fifth of a second apart (stops at once, exit 130).

Target: every case stops within the bound watch promises (noting the runs in flight + the serving
process's grace + stopping its server). One line per case gives its ratio to that bound; the last
line is ``worst_stop_ratio=<the largest of those ratios>`` (at most 1 meets the target).

    .venv/bin/python benchmarks/watch_shutdown.py [--cases idle,ticking,realigning,twice]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SMOKE_CONFIG, fresh_folder, print_metric

from trace_realign.flows import watch

BOUND_S = watch.BEFORE_STOP_S + watch.STOP_GRACE_S + watch.SERVER_STOP_TIMEOUT_S
CASES = ("idle", "ticking", "realigning", "twice")


def make_old(path: Path) -> None:
    """Date the file 100 s back, so that watch's first look counts it as already seen."""
    past = time.time() - 100
    os.utime(path, (past, past))


def wait_for(log: Path, text: str, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll the log until it holds ``text`` (True), or ``seconds`` pass or ``proc`` exits (False)."""
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(0.1)
    return True


def start(folder: Path, interval: float) -> tuple[subprocess.Popen, Path, Path]:
    """Start watch in its own session, logging to a file; return it once it serves (or exit)."""
    policy = folder / "policy.md"
    policy.write_text((ROOT / "configs" / "policies" / "smoke-new.md").read_text())
    make_old(policy)
    sets = [f"run.workdir={folder / 'work'}", f"run.name=bench-{folder.name}", "model.path=tiny-random",
            f"data.path={ROOT / 'data' / 'smoke' / 'pairs.jsonl'}", f"policy.path={policy}"]
    driver = (
        "import argparse, sys\nfrom trace_realign.flows.watch import cmd_watch\n"
        f"sys.exit(cmd_watch(argparse.Namespace(config={str(SMOKE_CONFIG)!r}, set={sets!r}, preset=[], "
        f"interval={interval!r}, cron=None, server=None, until='load')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    log = folder / "watch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_for(log, "serving ", 120.0, proc):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"watch did not start:\n{log.read_text()[-2000:]}")
    return proc, policy, log


def stop(proc: subprocess.Popen, twice: bool = False) -> tuple[float, int]:
    """Send Ctrl-C (twice: a second one 0.2 s later); return the seconds until exit and the exit code."""
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    if twice:
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=120)
    return time.monotonic() - t0, code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        ap.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")

    base = fresh_folder("trace-watch-stop-")
    ratios = []
    for case in cases:
        folder = base / case
        folder.mkdir()
        proc, policy, log = start(folder, 60.0 if case == "idle" else 2.0)
        if case == "idle":
            time.sleep(1.0)
        elif case == "realigning":
            policy.write_text(policy.read_text() + "\nCite a source.\n")
            make_old(policy)
            wait_for(log, "started realign run", 60.0)
        else:
            time.sleep(5.0)
        seconds, code = stop(proc, twice=case == "twice")
        ratios.append(seconds / BOUND_S)
        print(f"{case:<11} stopped in {seconds:5.1f} s  exit {code:<3}  stop/bound={seconds / BOUND_S:.3f}")
    print(f"bound={BOUND_S:.0f} s")
    print_metric("worst_stop_ratio", max(ratios))


if __name__ == "__main__":
    main()
