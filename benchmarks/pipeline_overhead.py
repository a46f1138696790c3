"""Benchmark: what Prefect and MLflow cost per stage, and how fast a cached rerun is.

Measures: configs/smoke.yaml run twice in this process, in a fresh working folder: once from
scratch, once with nothing changed (every stage answered from the cache). The embedded Prefect
server is started first by a trivial flow, so neither run pays for its start-up (reported on its
own). Per stage of the first run:

- wall: the flow's time around the task call (Prefect orchestration + the task body);
- body: the task run's own run time as Prefect recorded it;
- mlflow: seconds spent in MLflow client calls inside the body;
- compute = body - mlflow; Prefect overhead = wall - body.

Target: small orchestration and tracking overheads (``prefect_overhead_fraction`` and
``mlflow_overhead_fraction``, each over compute) and a cached rerun much faster than the first
run; the last line is ``cached_rerun_ratio=<second run's time / first run's time>``.

    .venv/bin/python benchmarks/pipeline_overhead.py
"""

from __future__ import annotations

import argparse

from common import Stopwatch, print_metric, smoke_run_folder


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    _, config = smoke_run_folder("trace-overhead-")  # before Prefect is first imported
    from prefect import flow
    from prefect.client.orchestration import get_client

    from trace_realign.flows.realign import realign

    @flow(name="warm-up")
    def warm_up():
        return 1

    with Stopwatch() as server_start:
        warm_up()
    with Stopwatch() as t_first:
        first = realign(config, progress=False)
    with Stopwatch() as t_second:
        second = realign(config, progress=False)
    assert all(s["cached"] for s in second["stages"].values()), "the second run was not fully cached"

    print(f"Prefect server start-up (once per process, not counted below): {server_start.seconds:.2f} s")
    print(f"{'stage':<12} {'wall s':>8} {'body s':>8} {'mlflow s':>9} {'compute s':>10} {'prefect/compute':>16} {'mlflow/compute':>15}")

    def row(label: str, wall: float, body: float, mlflow_s: float) -> None:
        compute = max(body - mlflow_s, 1e-9)
        print(
            f"{label:<12} {wall:>8.2f} {body:>8.2f} {mlflow_s:>9.2f} {compute:>10.2f} "
            f"{max(wall - body, 0.0) / compute:>16.3f} {mlflow_s / compute:>15.3f}"
        )

    totals = {"wall": 0.0, "body": 0.0, "mlflow": 0.0}
    with get_client(sync_client=True) as client:
        for stage, info in first["stages"].items():
            body = client.read_task_run(info["task_run_id"]).total_run_time.total_seconds()
            mlflow_s = info.get("info", {}).get("mlflow_seconds", 0.0)
            row(stage, info["seconds"], body, mlflow_s)
            totals["wall"] += info["seconds"]
            totals["body"] += body
            totals["mlflow"] += mlflow_s
    row("all stages", totals["wall"], totals["body"], totals["mlflow"])
    compute = totals["body"] - totals["mlflow"]
    print(
        f"first run {t_first.seconds:.2f} s (flow-level work outside stages: {t_first.seconds - totals['wall']:.2f} s); "
        f"cached rerun {t_second.seconds:.2f} s"
    )
    print_metric("prefect_overhead_fraction", (totals["wall"] - totals["body"]) / compute)
    print_metric("mlflow_overhead_fraction", totals["mlflow"] / compute)
    print_metric("cached_rerun_ratio", t_second.seconds / t_first.seconds)


if __name__ == "__main__":
    main()
