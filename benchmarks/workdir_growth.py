"""Benchmark: how much a working folder grows per fully cached rerun, and what ``gc`` gives back.

Runs configs/smoke.yaml in a fresh working folder (Prefect's home, the MLflow store and the
artifacts all inside it, as ``trace-realign run`` sets them), then three reruns with nothing
changed (every stage answered from the cache), and prints the bytes each part of the folder grew
by per rerun. Then plans ``trace-realign gc --keep 1``, applies it, and checks the kept run is
still answered from the cache.

    python benchmarks/workdir_growth.py

Last lines: growth_per_cached_rerun_bytes=<mean over the reruns>, and
gc_size_ratio=<folder bytes after gc / before>.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="trace-growth-")) / "run"

os.chdir(ROOT)
from trace_realign.flows.settings import prefect_environment  # noqa: E402

os.environ.update(prefect_environment(WORK))
PARTS = ("prefect", "mlflow.db", "mlruns", "runs", "artifacts", "verdicts.sqlite", "cache")
RERUNS = 3


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def sizes() -> dict[str, int]:
    out = {part: size(WORK / part) for part in PARTS}
    out["total"] = size(WORK)
    return out


def main() -> None:
    from trace_realign.flows.gc import apply_gc, plan_gc
    from trace_realign.flows.realign import realign
    from trace_realign.tasks.tracking import tracking_uri
    from trace_realign.core.config import load_config

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"run.workdir={WORK}"]).model_dump(mode="json")
    realign(cfg, progress=False)
    history = [sizes()]
    for _ in range(RERUNS):
        manifest = realign(cfg, progress=False)
        assert all(s["cached"] for s in manifest["stages"].values()), "a rerun was not fully cached"
        history.append(sizes())
    print(f"{'part':<16} {'after first run':>16} {'per cached rerun':>17}")
    for part in (*PARTS, "total"):
        growth = (history[-1][part] - history[0][part]) / RERUNS
        print(f"{part:<16} {history[0][part]:>16,} {growth:>17,.0f}")
    before = size(WORK)
    plan = plan_gc(WORK, keep=1)
    apply_gc(plan, tracking_uri(WORK, None))
    after = size(WORK)
    kept = realign(cfg, progress=False)
    assert all(s["cached"] for s in kept["stages"].values()), "gc deleted something the kept run needs"
    print(f"gc --keep 1: {len(plan.paths)} paths and {len(plan.mlflow_runs)} MLflow runs deleted; folder {before:,} -> {after:,} bytes")
    print(f"growth_per_cached_rerun_bytes={(history[-1]['total'] - history[0]['total']) / RERUNS:.0f}")
    print(f"gc_size_ratio={after / before:.3f}")


if __name__ == "__main__":
    main()
