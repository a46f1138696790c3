"""Benchmark: how long ``trace-realign watch`` takes to stop on Ctrl-C, against its own bound.

Starts ``watch`` on configs/smoke.yaml (the tiny model, each triggered realign run stopping after
``load``) with the Prefect server it starts itself, in a fresh working folder, and sends SIGINT:

- idle: a minute-long interval, stopped a second after it serves;
- ticking: a 2-second interval, stopped while ticks run;
- realigning: a 2-second interval, the policy edited, stopped while the realign run it started runs;
- twice: two Ctrl-C a fifth of a second apart (stops at once, exit 130).

    python benchmarks/watch_shutdown.py

One line per case: seconds from the first SIGINT to exit, the exit code, and the ratio to the bound
watch promises (noting the runs in flight + the serving process's grace + stopping its server).
Last line: worst_stop_ratio=<the largest of those ratios> (at most 1 means every stop kept the bound).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trace_realign.flows import watch  # noqa: E402

BOUND_S = watch.BEFORE_STOP_S + watch.STOP_GRACE_S + watch.SERVER_STOP_TIMEOUT_S


def start(folder: Path, interval: float) -> tuple[subprocess.Popen, Path, Path]:
    policy = folder / "policy.md"
    policy.write_text((ROOT / "configs" / "policies" / "smoke-new.md").read_text())
    past = time.time() - 100
    os.utime(policy, (past, past))
    sets = [f"run.workdir={folder / 'work'}", f"run.name=bench-{folder.name}", "model.path=tiny-random",
            f"data.path={ROOT / 'data' / 'smoke' / 'pairs.jsonl'}", f"policy.path={policy}"]
    driver = (
        "import argparse, sys\nfrom flows.watch import cmd_watch\n"
        f"sys.exit(cmd_watch(argparse.Namespace(config={str(ROOT / 'configs' / 'smoke.yaml')!r}, set={sets!r}, "
        f"interval={interval!r}, cron=None, server=None, until='load')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    log = folder / "watch.log"
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "serving " not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"watch did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, policy, log


def stop(proc: subprocess.Popen, twice: bool = False) -> tuple[float, int]:
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    if twice:
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=120)
    return time.monotonic() - t0, code


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="trace-watch-stop-"))
    ratios = []
    for case in ("idle", "ticking", "realigning", "twice"):
        folder = base / case
        folder.mkdir()
        proc, policy, log = start(folder, 60.0 if case == "idle" else 2.0)
        if case == "idle":
            time.sleep(1.0)
        elif case == "realigning":
            policy.write_text(policy.read_text() + "\nCite a source.\n")
            os.utime(policy, (time.time() - 100, time.time() - 100))
            deadline = time.monotonic() + 60
            while "started realign run" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            time.sleep(5.0)
        seconds, code = stop(proc, twice=case == "twice")
        ratios.append(seconds / BOUND_S)
        print(f"{case:<11} stopped in {seconds:5.1f} s  exit {code:<3}  stop/bound={seconds / BOUND_S:.3f}")
    print(f"bound={BOUND_S:.0f} s")
    print(f"worst_stop_ratio={max(ratios):.3f}")


if __name__ == "__main__":
    main()
