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


def quiet_mlflow() -> None:
    """No telemetry, and (against a tracking server) none of MLflow's two "View run ... at" lines
    per finished run: a run prints its own link (:func:`ui_link`), which opens the runs in the UI's
    model-training view. Each is a default the environment can override."""
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def tracking_uri(workdir: str | Path, configured: str | None) -> str:
    if configured:
        return configured
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def client(uri: str):
    quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow's mark of a model-training experiment (rather than a GenAI one), read by MLflow's own tools.
MLflow 3.17's UI does not follow it: it opens the view of its GenAI / Model training switch (see
:func:`ui_link`)."""


def serves_artifacts(uri: str) -> bool:
    """Whether ``uri`` is a tracking server, which keeps the artifacts where it is configured to
    (``mlflow server --serve-artifacts`` proxies them): the client then names no artifact folder."""
    return uri.split(":", 1)[0].lower() in ("http", "https")


def ui_link(server: str, experiment: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of ``experiment``'s runs (or of run ``run_id``) on ``server``
    (``http://host:port``), in its model-training view.

    MLflow 3.17's UI opens an experiment in the view its GenAI / Model training switch last showed in
    this browser (GenAI at first), whatever the experiment's kind tag says; the link's
    ``workflowType=machine_learning`` opens the model-training view (runs, metrics, models) instead.
    """
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{server.rstrip('/')}/#/experiments/{experiment}/{page}?workflowType=machine_learning"


def experiment_id(c, name: str, workdir: str | Path) -> str:
    """The id of experiment ``name``, created when missing (a local store's artifacts in
    ``<workdir>/mlruns``; a tracking server's where the server puts them). The experiment is marked
    a model-training experiment for the UI (:data:`EXPERIMENT_KIND`) unless it has a kind already."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = None if serves_artifacts(c.tracking_uri) else (Path(workdir).resolve() / "mlruns").as_uri()
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


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


def log_model_output(c, run_id: str, model_id: str) -> None:
    """Record the logged model ``model_id`` as an output of run ``run_id`` (listed under the run's
    logged and registered models in the UI)."""
    from mlflow.entities import LoggedModelOutput

    c.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def register_model(c, name: str, model_id: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register the logged model ``model_id`` (made by run ``run_id``) as a new version of ``name``,
    creating the registered model the first time; returns the new version.

    ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` loads the version, and it is listed in
    the logged model's ``mlflow.modelVersions`` tag (what the UI shows under a run's registered
    models). Its source is ``models:/<model_id>`` on a tracking server; a local store gets the logged
    model's artifact folder instead (MLflow's local registry would look ``models:/<model_id>`` up in
    the process-wide default store, not in ``c``'s). Raises MlflowException for anything but
    "already exists".
    """
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"models:/{model_id}" if serves_artifacts(c.tracking_uri) else c.get_logged_model(model_id).artifact_location
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags), model_id=model_id)
    _link_model_version(c, model_id, name, mv.version)
    return mv.version


def _link_model_version(c, model_id: str, name: str, version: str) -> None:
    """Record ``name`` version ``version`` in the logged model's ``mlflow.modelVersions`` tag (what the
    UI reads to show a run's registered models). A tracking server records it itself when the version
    is created; a local store does not: the entry is added only when missing."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    versions = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
        c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, {"name": name, "version": version}])})


# --- the parent run's description ------------------------------------------------------------------

DESCRIPTION_TAG = "mlflow.note.content"
"""The run tag the MLflow UI shows (and edits) as the run's description."""

SUMMARY_KEYS = ("judge_accuracy", "judge_labelled_accuracy", "utility_ratio")
"""Evaluation metrics with one value (no before/after), shown under the before/after table."""


def before_after(metrics: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """``(name, before, after)`` for every numeric ``<name>_before``/``<name>_after`` pair of the
    evaluate stage's ``metrics``, by name."""
    rows = []
    for key in sorted(k[: -len("_before")] for k in metrics if k.endswith("_before")):
        before, after = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            rows.append((key, float(before), float(after)))
    return rows


def run_description(manifest: Mapping[str, Any]) -> str:
    """The parent run's description (Markdown, the ``mlflow.note.content`` tag the UI shows): what was
    realigned to which policy, its status, and the evaluation's before/after table (or why there is
    none), cut to MLflow's tag limit."""
    policy = manifest["policy"]
    lines = [
        f"TRACE realignment of `{manifest['model']['spec']}` to policy "
        f"{policy.get('name') or Path(policy['path']).name} v{policy.get('version') or '?'} (sha256 {policy['sha256'][:12]}): "
        f"{manifest['status']}, until {manifest['until']}.",
        "",
    ]
    metrics = manifest["stages"].get("evaluate", {}).get("metrics", {})
    rows = before_after(metrics)
    if rows:
        lines += ["| metric | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {key} | {before:.3f} | {after:.3f} |" for key, before, after in rows]
        lines += [""] + [f"- {key}: {metrics[key]:.3f}" for key in SUMMARY_KEYS if isinstance(metrics.get(key), (int, float))]
    else:
        lines.append("No before/after table: the evaluate stage did not run.")
    if manifest.get("registered_model_name") and manifest["stages"].get("train", {}).get("info", {}).get("registered_version"):
        version = manifest["stages"]["train"]["info"]["registered_version"]
        lines += ["", f"Registered model: `models:/{manifest['registered_model_name']}/{version}`"]
    return tag_value("\n".join(lines).strip())


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
