"""MLflow tracking for the pipeline: a parent run per flow run, a child run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent "active
run": MLflow keeps the active run per thread, and Prefect may run a task in a worker thread.
The store defaults to SQLite and an artifact folder inside the run's working folder.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

_MAX_PARAM = 500  # MLflow's limit on a param value's length


def disable_telemetry() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(workdir: str | Path, configured: str | None) -> str:
    if configured:
        return configured
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def client(uri: str):
    disable_telemetry()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c, name: str, workdir: str | Path) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (Path(workdir).resolve() / "mlruns").as_uri()
    return c.create_experiment(name, artifact_location=location)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested settings as flat ``a.b.c`` params (lists and scalars as their text)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def log_params(c, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten("", params).items()]
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(c, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
    for start in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[start : start + 500])


def log_history(c, run_id: str, history: list[dict], prefix: str = "train/") -> None:
    """Trainer log history as step-indexed metrics."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(prefix + k, float(v), now, int(h.get("step", 0)))
        for h in history
        for k, v in h.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float))
    ]
    for start in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[start : start + 500])


class TimedClient:
    """An MlflowClient that adds up the seconds spent in its calls (the stage's MLflow overhead)."""

    def __init__(self, inner):
        self._inner = inner
        self.seconds = 0.0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


@contextmanager
def stage_run(uri: str, experiment: str, workdir: str | Path, parent_run_id: str | None, stage: str, tags=None) -> Iterator[tuple[Any, str]]:
    """A child run for one stage; FINISHED on success, FAILED on an exception."""
    c = TimedClient(client(uri))
    run_tags = {"mlflow.runName": stage, "stage": stage, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, experiment, workdir), tags=run_tags)
    try:
        yield c, run.info.run_id
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")


def log_dataset(c, run_id: str, name: str, path: str | Path, digest: str, rows: int | None = None) -> None:
    """Record a data file as a run input (shown under Datasets in the MLflow UI)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(
        name=name,
        digest=digest[:36],
        source_type="local",
        source=str(Path(path).resolve()),
        schema=None,
        profile=None if rows is None else f'{{"num_rows": {rows}}}',
    )
    c.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])])


def register_model(c, name: str, run_id: str, artifact_path: str, tags: Mapping[str, str]) -> str:
    """Register the run's logged model folder in the model registry; returns the new version."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException:
        pass  # it exists already
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
    return mv.version
