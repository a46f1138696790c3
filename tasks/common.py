"""What every stage task shares: the run context, the cache key, the stage result.

Cache key: a stage is reused across flow runs when its task source and its parameters are the
same. Parameters carry content hashes (of the data file, the policy, upstream artifacts, which
are named by content hash) and the stage's config section, never a bare path to a file that
could change behind it. The run context (MLflow parent run id, working folder) is left out: it
changes every run and does not change what the stage computes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator


from trace_realign.tasks import tracking


@dataclass
class RunContext:
    """Where a run writes and logs; not part of any cache key."""

    workdir: str
    mlflow_uri: str
    experiment: str
    parent_run_id: str | None = None
    progress: bool = True
    fail_training_at_step: int | None = None  # test switch: crash training after this step's checkpoint

    def folder(self, *parts: str) -> Path:
        p = Path(self.workdir, *parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def as_dict(self) -> dict:
        return asdict(self)


def context_of(run: dict | RunContext) -> RunContext:
    return run if isinstance(run, RunContext) else RunContext(**run)


def tree_sha256(roots) -> str:
    """sha256 over the names of ``roots`` and the relative paths and bytes of their ``*.py`` files."""
    from trace_realign.tasks.artifacts import folder_sha256

    return hashlib.sha256(json.dumps([[Path(r).name, folder_sha256(r, "*.py")] for r in roots]).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the source of ``trace_core`` and ``tasks``: what a stage's result depends on
    besides its parameters. A change to a helper or to the library recomputes the stages (judge
    verdicts stay in the verdict cache, so no question is paid for twice)."""
    import trace_realign.core as trace_core

    return tree_sha256([Path(trace_core.__file__).parent, Path(__file__).parent])


UNKEYED_PARAMETERS = frozenset({"run", "refresh_unknown", "refresh_known"})
"""Task parameters that say how to run, not what is computed: the run context (it changes every
run) and the judge's re-ask switches (a ``--fresh judge`` run stores its result under the same key,
so the next plain run is served the refreshed verdicts)."""


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """sha256 of the task's name and source, the code it runs, and its parameters without
    :data:`UNKEYED_PARAMETERS`."""
    keyed = {k: v for k, v in parameters.items() if k not in UNKEYED_PARAMETERS}
    source = inspect.getsource(context.task.fn)
    payload = json.dumps([context.task.name, source, code_fingerprint(), keyed], sort_keys=True, default=str)
    return context.task.name + "-" + hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class StageResult:
    """A stage's small, persisted result: artifact descriptions, its MLflow run, its numbers."""

    stage: str
    artifacts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return self.artifacts[name]["path"]

    def sha(self, name: str) -> str:
        return self.artifacts[name]["sha256"]

    def artifact_paths(self) -> list[str]:
        out = []
        for a in self.artifacts.values():
            out.extend(x["path"] for x in (a if isinstance(a, list) else [a]))
        return out


class StageRun:
    """One stage's MLflow child run: what every stage task logs, in one place.

    ``client`` and ``run_id`` are there for what only some stages log (datasets, training history,
    a registered model)."""

    def __init__(self, stage: str, client, run_id: str):
        self.stage = stage
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``params`` now (before work that may fail, so a failed run still shows its settings)."""
        tracking.log_params(self.client, self.run_id, params)

    def result(
        self, artifacts: dict[str, Any], metrics: dict[str, Any], params: dict[str, Any] | None = None, info: dict[str, Any] | None = None
    ) -> StageResult:
        """Log ``params`` (if not logged already) and ``metrics`` to the stage's run and return the
        stage's result, with the seconds spent talking to MLflow in ``info["mlflow_seconds"]``."""
        if params is not None:
            self.log_params(params)
        tracking.log_metrics(self.client, self.run_id, metrics)
        return StageResult(self.stage, artifacts, metrics, self.run_id, {**(info or {}), "mlflow_seconds": self.client.seconds})


@contextlib.contextmanager
def stage_run(run: dict | RunContext, stage: str) -> Iterator[StageRun]:
    """The stage's MLflow child run under the flow's parent run: FINISHED when the block ends, FAILED
    when it raises."""
    ctx = context_of(run)
    with tracking.child_run(ctx.mlflow_uri, ctx.experiment, ctx.workdir, ctx.parent_run_id, stage) as (client, run_id):
        yield StageRun(stage, client, run_id)


class Bar:
    """A tqdm progress bar fed by trace_core's ``progress`` callbacks (absolute or incremental)."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (logs and CI would get a line per update).
        self.bar = tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)

    def add(self, n: float) -> None:
        self.bar.update(n)

    def absolute(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
