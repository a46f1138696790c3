"""Benchmark: the main job (configs/demo.yaml) end to end, against its targets on 2 CPU cores.

Measures: ``trace-realign run --config configs/demo.yaml`` run as a user would, in a fresh working
folder and, unless ``--keep-model-cache``, with an empty model cache (``TRACE_REALIGN_HOME`` in a
temporary folder), so the one-time preparation of the old-policy model (GGUF conversion, then its
fine-tune) is counted as a newcomer pays it. The installation (``scripts/setup.sh``) is not
counted. Prints each stage's seconds and peak resident memory from the run manifest (the model
preparation's too), the peak resident memory of the run and the before/after metrics.

Targets: the whole run within 10 minutes (goal) and 12 (bar), peak resident memory at most 4 GiB;
the last lines are ``goal_ratio=<seconds / 600>``, ``bar_ratio=<seconds / 720>`` and
``memory_ratio=<peak GiB / 4>`` (at most 1 meets each).

    .venv/bin/python benchmarks/demo_end_to_end.py [--keep-model-cache] [--set KEY=VALUE ...]

``--config configs/smoke.yaml`` runs the same measurement on the minute-long smoke config (a check
of this script, not of the target). Nothing else should run on the machine meanwhile: on 2 cores
any other work shows in the time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import ROOT, Stopwatch, fresh_folder, peak_rss_mb, print_metric, run_checked

from trace_realign.flows.stages import STAGES

GOAL_S, BAR_S, MEMORY_GIB = 10 * 60, 12 * 60, 4.0
METRICS = ("tpa_before", "tpa_after", "labelled_tpa_before", "labelled_tpa_after", "judge_labelled_accuracy", "utility_ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-model-cache", action="store_true", help="reuse the prepared models (not a newcomer's first run)")
    ap.add_argument("--config", default="configs/demo.yaml", help="the run's config (default: the demo; the target is the demo's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to trace-realign run")
    args = ap.parse_args()

    tmp = fresh_folder("trace-demo-bench-")
    env = {**os.environ}
    if not args.keep_model_cache:
        env["TRACE_REALIGN_HOME"] = str(tmp / "home")
    cmd = [sys.executable, "-m", "trace_realign.flows.cli", "run", "--config", args.config, "--no-progress",
           "--set", f"run.workdir={tmp / 'work'}"]
    for item in args.set:
        cmd += ["--set", item]
    with Stopwatch() as run:
        run_checked(cmd, f"the demo run (work folder {tmp})", cwd=ROOT, env=env)
    total = run.seconds

    manifest = json.loads(Path(tmp / "work" / "runs" / "last.json").read_text())
    manifest = json.loads(Path(manifest["manifest"]).read_text())
    # judge-0000, judge-0001, ... sort under "judge"
    def order(name: str) -> tuple[int, str]:
        stage = name.split("-")[0]
        return (STAGES.index(stage) if stage in STAGES else len(STAGES), name)

    in_order = sorted(manifest["stages"], key=order)
    print(f"{'stage':<20} {'seconds':>9} {'share':>7} {'peak GiB':>9}")
    rows = [(name, manifest["stages"][name]) for name in in_order]
    if "model_preparation" in manifest:
        rows.insert(0, ("model preparation", manifest["model_preparation"]))
    for name, info in rows:
        print(f"{name:<20} {info['seconds']:>9.1f} {info['seconds'] / total:>7.3f} {info['peak_rss_mib'] / 1024:>9.2f}")
    outside = total - sum(info["seconds"] for _, info in rows)
    print(f"{'other':<20} {outside:>9.1f} {outside / total:>7.3f}   (process and server start-up, summary)")
    print(f"{'end to end':<20} {total:>9.1f}")
    peak_gib = peak_rss_mb(children=True) / 1024
    print(f"peak resident memory of the run: {peak_gib:.1f} GiB")
    metrics = manifest["stages"].get("evaluate", {}).get("metrics", {})
    for key in METRICS:
        if key in metrics:
            print_metric(key, metrics[key])
    print(f"model cache: {'kept' if args.keep_model_cache else 'empty at start'}; work folder {tmp}")
    print_metric("goal_ratio", total / GOAL_S)
    print_metric("bar_ratio", total / BAR_S)
    print_metric("memory_ratio", peak_gib / MEMORY_GIB)


if __name__ == "__main__":
    main()
