"""Benchmark: how much a working folder grows per fully cached rerun, and what ``gc`` gives back.

Measures: configs/smoke.yaml run in a fresh working folder (Prefect's home, the MLflow store and
the artifacts all inside it, as ``trace-realign run`` sets them), then ``--reruns`` reruns with
nothing changed (every stage answered from the cache); prints the bytes each part of the folder
grew by per rerun. Then plans ``trace-realign gc --keep 1``, applies it, and checks the kept run
is still answered from the cache.

Target: a cached rerun adds little (``growth_per_cached_rerun_bytes=<mean over the reruns>``) and
gc gives the reruns' growth back (``gc_size_ratio=<folder bytes after gc / before>``), the last
two lines.

    .venv/bin/python benchmarks/workdir_growth.py [--reruns 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import print_metric, smoke_run_folder

PARTS = ("prefect", "mlflow.db", "mlruns", "runs", "artifacts", "verdicts.sqlite", "cache")


def size(path: Path) -> int:
    """Bytes of a file, or of all files below a folder (0 for a path that does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def sizes(workdir: Path) -> dict[str, int]:
    """Bytes of each part of the working folder, and of the whole folder under "total"."""
    out = {part: size(workdir / part) for part in PARTS}
    out["total"] = size(workdir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reruns", type=int, default=3, help="fully cached reruns after the first run")
    args = ap.parse_args()
    if args.reruns < 1:
        ap.error("--reruns must be at least 1")

    workdir, config = smoke_run_folder("trace-growth-")  # before Prefect is first imported

    from trace_realign.flows.gc import apply_gc, plan_gc
    from trace_realign.flows.realign import realign
    from trace_realign.tasks.tracking import tracking_uri

    def cached_run(failure: str) -> None:
        manifest = realign(config, progress=False)
        assert all(s["cached"] for s in manifest["stages"].values()), failure

    realign(config, progress=False)
    history = [sizes(workdir)]
    for _ in range(args.reruns):
        cached_run("a rerun was not fully cached")
        history.append(sizes(workdir))
    print(f"{'part':<16} {'after first run':>16} {'per cached rerun':>17}")
    for part in (*PARTS, "total"):
        growth = (history[-1][part] - history[0][part]) / args.reruns
        print(f"{part:<16} {history[0][part]:>16,} {growth:>17,.0f}")
    before = size(workdir)
    plan = plan_gc(workdir, keep=1)
    apply_gc(plan, tracking_uri(workdir, None))
    after = size(workdir)
    cached_run("gc deleted something the kept run needs")
    print(f"gc --keep 1: {len(plan.paths)} paths and {len(plan.mlflow_runs)} MLflow runs deleted; folder {before:,} -> {after:,} bytes")
    print_metric("growth_per_cached_rerun_bytes", (history[-1]["total"] - history[0]["total"]) / args.reruns, ".0f")
    print_metric("gc_size_ratio", after / before)


if __name__ == "__main__":
    main()
