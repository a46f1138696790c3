"""MLflow tracking for the pipeline: a parent run per flow run, a child run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent "active
run": MLflow keeps the active run per thread, and Prefect may run a task in a worker thread.
The store defaults to SQLite and an artifact folder inside the run's working folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from trace_realign.core.errors import ConfigError

_MAX_PARAM = 500  # what the runs keep of a param value (MLflow's own limit is 6000 characters)
MAX_KEY_LENGTH = 250  # MLflow's limit on metric, param and tag keys
MAX_TAG_VALUE_LENGTH = 8000  # MLflow's limit on a tag value
MAX_EXPERIMENT_NAME_LENGTH = 500
_KEY_CHARACTERS = re.compile(r"[^/\w.\- :]")  # MLflow: alphanumerics, _ - . space : and /


# --- names built from user input ------------------------------------------------------------------
# MLflow checks names only when they are used: a registered-model name after training, a metric key
# built from an evaluation group after generation. Everything a run will send is checked (or mapped
# to a valid name, with the original recorded) before any stage runs.


def metric_key(key: str) -> str:
    """``key`` as a valid MLflow metric/param/tag key: the same key when it is valid already.

    MLflow allows alphanumerics, ``_ - . : /`` and spaces, at most 250 characters, and no key that
    a path normalisation would change (``a//b``, ``./a``, ``a/``, ``..``). Other characters become
    ``_``; a key that had to change, or was too long, gets 8 hex digits of the original's sha256,
    so two different keys never map to the same one.
    """
    if _valid_key(key):
        return key
    cleaned = _KEY_CHARACTERS.sub("_", key)
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    cleaned = "/".join(parts) or "_"
    suffix = "~" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = cleaned[: MAX_KEY_LENGTH - len(suffix)] + suffix
    # "~" is not allowed either; "-" keeps the suffix readable.
    return cleaned.replace("~", "-")


def _valid_key(key: str) -> bool:
    if not key or len(key) > MAX_KEY_LENGTH or _KEY_CHARACTERS.search(key):
        return False
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith(("..", "/"))


def model_name_problem(name: str) -> str | None:
    """Why MLflow's model registry would refuse ``name`` (None when it accepts it)."""
    if not name or not name.strip():
        return "it is empty"
    if "/" in name or ":" in name:
        return "names cannot contain '/' or ':'"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        return f"a path normalisation would change it to {norm!r}"
    if len(name) > MAX_KEY_LENGTH:
        return f"it is longer than {MAX_KEY_LENGTH} characters"
    return None


def registered_model_name(run_name: str, configured: str | None) -> tuple[str, str | None]:
    """The registry name a run registers its adapter under, and the name it was derived from when
    that had to be changed.

    ``mlflow.registered_model_name`` is used as given and must be valid (ConfigError naming the
    setting otherwise). The default, ``<run.name>-realigned``, is mapped to a valid name
    (``team/smoke`` -> ``team-smoke-realigned``); the second value is then the unmapped default.
    """
    if configured is not None:
        problem = model_name_problem(configured)
        if problem:
            raise ConfigError(f"mlflow.registered_model_name {configured!r}: MLflow's model registry refuses it ({problem})")
        return configured, None
    wanted = f"{run_name}-realigned"
    if model_name_problem(wanted) is None:
        return wanted, None
    mapped = re.sub(r"[/:]+", "-", wanted).strip(" .-") or "realigned"
    mapped = "-".join(p for p in mapped.split("-") if p not in ("", ".", ".."))
    if model_name_problem(mapped) is not None:  # too long, or a path-like leftover
        digest = hashlib.sha256(wanted.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        mapped = re.sub(r"[^\w-]", "-", mapped)[: MAX_KEY_LENGTH - 20].strip("-") + f"-{digest}-realigned"
    return mapped, wanted


def check_experiment_name(name: str) -> None:
    """ConfigError naming ``mlflow.experiment`` when MLflow would refuse the experiment name."""
    if not name or not name.strip():
        raise ConfigError("mlflow.experiment: the experiment name is empty")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise ConfigError(f"mlflow.experiment: longer than MLflow's {MAX_EXPERIMENT_NAME_LENGTH} characters ({len(name)})")


def tag_value(value: Any) -> str:
    """A tag value MLflow accepts: text, cut to 8000 characters."""
    text = str(value)
    return text if len(text) <= MAX_TAG_VALUE_LENGTH else text[: MAX_TAG_VALUE_LENGTH - 3] + "..."


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


def _record_renamed(c, run_id: str, renamed: dict[str, str], what: str) -> None:
    """Keep the original of every key :func:`metric_key` had to change, as a tag of the run."""
    if renamed:
        c.set_tag(run_id, f"trace.renamed_{what}", tag_value(json.dumps(renamed, ensure_ascii=False, sort_keys=True)))


def log_params(c, run_id: str, params: Mapping[str, Any]) -> None:
    """Nested settings as flat params (values cut to 500 characters, keys made valid)."""
    from mlflow.entities import Param

    flat = flatten("", params)
    renamed = {metric_key(k): k for k in flat if metric_key(k) != k}
    items = [Param(metric_key(k), str(v)[:_MAX_PARAM]) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])
    _record_renamed(c, run_id, renamed, "params")


def log_metrics(c, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Numeric, finite-or-infinite (not NaN) values as metrics; keys built from data (evaluation
    groups) are made valid with :func:`metric_key` and their originals kept in a tag."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    renamed = {metric_key(k): k for k in numeric if metric_key(k) != k}
    items = [Metric(metric_key(k), float(v), now, step) for k, v in numeric.items()]
    for start in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[start : start + 500])
    _record_renamed(c, run_id, renamed, "metrics")


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


def process_tags(workdir: str | Path) -> dict[str, str]:
    """Tags naming the working folder and the process of a run, so a later run can tell a run
    whose process died (still RUNNING) from one that is alive elsewhere."""
    import socket

    return {"trace.workdir": str(Path(workdir).resolve()), "trace.pid": str(os.getpid()), "trace.host": socket.gethostname()}


def close_dead_runs(c, experiment_id: str, workdir: str | Path) -> list[str]:
    """Mark this working folder's runs that are still RUNNING as KILLED, with the reason in a tag.

    Called by a run that holds the folder's lock (:mod:`trace_realign.flows.workdir`): no other process can be
    running in the folder, so a RUNNING run of it was left by a process that died (SIGKILL, power
    loss), unless it is this very process's (a comparison whose realign runs it holds open).
    Returns their run ids (parent and stage runs alike).
    """
    from mlflow.entities import ViewType

    folder = str(Path(workdir).resolve())
    mine = process_tags(workdir)
    running = c.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ACTIVE_ONLY, max_results=5000
    )
    closed = []
    for r in running:
        if r.data.tags.get("trace.workdir") != folder:
            continue  # another folder's run (a shared tracking server): not ours to judge
        if all(r.data.tags.get(k) == mine[k] for k in ("trace.pid", "trace.host")):
            continue  # this process's own run, still going (a comparison around this run)
        pid = r.data.tags.get("trace.pid", "?")
        c.set_tag(r.info.run_id, "trace.killed_reason", f"process {pid} ended without finishing this run (found by a later run)")
        c.set_terminated(r.info.run_id, status="KILLED")
        closed.append(r.info.run_id)
    return closed


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
def child_run(uri: str, experiment: str, workdir: str | Path, parent_run_id: str | None, stage: str, tags=None) -> Iterator[tuple[Any, str]]:
    """A child run for one stage; FINISHED on success, FAILED on an exception."""
    c = TimedClient(client(uri))
    run_tags = {"mlflow.runName": stage, "stage": stage, **process_tags(workdir), **(tags or {})}
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
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
    return mv.version


# --- housekeeping (trace-realign gc) ---------------------------------------------------------------


def _all_runs(c) -> list:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    runs, token = [], None
    while experiments:
        page = c.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def runs_to_delete(uri: str, workdir: str | Path, keep: set[str]) -> list[str]:
    """This working folder's MLflow runs that ``gc`` may delete: all but ``keep`` and the runs a
    registered model version was made from (a kept stage run whose parent goes stays, as a run of
    its own: its artifacts are what a later run's cached stage points at).

    A store that is the folder's own default SQLite file holds only this folder's runs; in any
    other store (a tracking server) only runs tagged with this folder (``trace.workdir``) count.
    """
    c = client(uri)
    folder = str(Path(workdir).resolve())
    own_store = uri == tracking_uri(workdir, None)
    runs = _all_runs(c)
    keep = set(keep) | {mv.run_id for mv in c.search_model_versions() if mv.run_id}
    return sorted(
        r.info.run_id
        for r in runs
        if r.info.run_id not in keep and (own_store or r.data.tags.get("trace.workdir") == folder)
    )


def artifact_bytes(uri: str, run_ids: list[str]) -> int:
    """Bytes of the runs' artifacts where they are local files (0 for remote artifact stores)."""
    from urllib.parse import unquote, urlparse

    c = client(uri)
    total = 0
    for run_id in run_ids:
        location = urlparse(c.get_run(run_id).info.artifact_uri)
        if location.scheme in ("", "file"):
            folder = Path(unquote(location.path))
            if folder.is_dir():
                total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total


def delete_runs(uri: str, run_ids: list[str]) -> None:
    """Mark runs deleted (MLflow's soft delete; ``mlflow gc`` purges them and their artifacts)."""
    c = client(uri)
    for run_id in run_ids:
        if c.get_run(run_id).info.lifecycle_stage != "deleted":
            c.delete_run(run_id)
