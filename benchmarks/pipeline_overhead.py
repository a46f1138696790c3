"""Benchmark: what Prefect and MLflow cost per stage, and how fast a cached rerun is.

Runs configs/smoke.yaml twice in this process, in a fresh working folder: once from scratch,
once with nothing changed (every stage answered from the cache). The embedded Prefect server is
started first by a trivial flow, so neither run pays for its start-up (reported on its own).

Per stage of the first run:
- wall: the flow's time around the task call (Prefect orchestration + the task body);
- body: the task run's own run time as Prefect recorded it;
- mlflow: seconds spent in MLflow client calls inside the body;
- compute = body - mlflow; Prefect overhead = wall - body.

    python benchmarks/pipeline_overhead.py

Last line: cached_rerun_ratio=<second run's time / first run's time>.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="trace-overhead-"))

os.chdir(ROOT)
from trace_realign.flows.settings import prefect_environment  # noqa: E402

os.environ.update(prefect_environment(WORK))


def main():
    from prefect import flow
    from prefect.client.orchestration import get_client

    from trace_realign.flows.realign import realign
    from trace_realign.core.config import load_config

    @flow(name="warm-up")
    def warm_up():
        return 1

    t0 = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t0

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"run.workdir={WORK / 'run'}"]).model_dump(mode="json")
    t0 = time.perf_counter()
    first = realign(cfg, progress=False)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = realign(cfg, progress=False)
    t_second = time.perf_counter() - t0
    assert all(s["cached"] for s in second["stages"].values()), "the second run was not fully cached"

    print(f"Prefect server start-up (once per process, not counted below): {server_start:.2f} s")
    print(f"{'stage':<12} {'wall s':>8} {'body s':>8} {'mlflow s':>9} {'compute s':>10} {'prefect/compute':>16} {'mlflow/compute':>15}")
    totals = {"wall": 0.0, "body": 0.0, "mlflow": 0.0}
    with get_client(sync_client=True) as client:
        for stage, info in first["stages"].items():
            body = client.read_task_run(info["task_run_id"]).total_run_time.total_seconds()
            mlflow_s = info.get("info", {}).get("mlflow_seconds", 0.0)
            compute = max(body - mlflow_s, 1e-9)
            prefect_s = max(info["seconds"] - body, 0.0)
            totals["wall"] += info["seconds"]
            totals["body"] += body
            totals["mlflow"] += mlflow_s
            print(
                f"{stage:<12} {info['seconds']:>8.2f} {body:>8.2f} {mlflow_s:>9.2f} {compute:>10.2f} "
                f"{prefect_s / compute:>16.3f} {mlflow_s / compute:>15.3f}"
            )
    compute = totals["body"] - totals["mlflow"]
    print(
        f"{'all stages':<12} {totals['wall']:>8.2f} {totals['body']:>8.2f} {totals['mlflow']:>9.2f} {compute:>10.2f} "
        f"{(totals['wall'] - totals['body']) / compute:>16.3f} {totals['mlflow'] / compute:>15.3f}"
    )
    print(f"first run {t_first:.2f} s (flow-level work outside stages: {t_first - totals['wall']:.2f} s); cached rerun {t_second:.2f} s")
    print(f"prefect_overhead_fraction={(totals['wall'] - totals['body']) / compute:.3f}")
    print(f"mlflow_overhead_fraction={totals['mlflow'] / compute:.3f}")
    print(f"cached_rerun_ratio={t_second / t_first:.3f}")


if __name__ == "__main__":
    main()
