"""Utility on standard benchmarks through lm-evaluation-harness (PyPI ``lm-eval``), before and after
realignment.

The harness runs in-process on the models the evaluation stage already holds: the reference (the
LoRA model with its adapter disabled, or the frozen reference after full fine-tuning) and the
realigned model, each wrapped in the harness's ``HFLM``. Tasks are the harness's own (MMLU,
HellaSwag, GSM8K, GPQA, ...; their data sets download from the Hugging Face hub, so they need
network), the tasks that ship with the package (``data/lm_eval``: a small multiple-choice task
that runs offline) and the user's own YAML tasks in ``evaluation.lm_eval.include_path``.

``lm_eval`` is imported inside the functions, so importing this module (and
``trace_realign.core``) stays light.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trace_realign.core.config import SHIPPED_LM_EVAL_TASKS, LmEvalConfig
from trace_realign.core.errors import ConfigError
from trace_realign.core.evaluation.generation import as_reference
from trace_realign.core.modeling import eval_mode

HUB_TASK_EXAMPLES = ("mmlu", "hellaswag", "gsm8k", "gpqa")
"""Harness tasks the README shows for users with network (their data sets are on the hub)."""

RESULT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
"""The parts of the harness's results that describe the work done; its timings, dates, git hash and
environment report are left out, so the same work gives the same artifact bytes."""


def shipped_tasks(folder: Path = SHIPPED_LM_EVAL_TASKS) -> dict[str, Path]:
    """``{task name: YAML file}`` of the harness tasks in ``folder`` (default: the shipped ones); the
    name is each YAML file's ``task`` key."""
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[cfg["task"]] = path
    return out


def shipped_task_config(path: Path) -> dict[str, Any]:
    """A shipped task's YAML as the harness's inline task config, its relative
    ``dataset_kwargs.data_files`` resolved beside the YAML file (the harness would resolve them in
    the working folder)."""
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {split: str(path.parent / f) for split, f in files.items()}
    return cfg


@dataclass
class BenchmarkPlan:
    """The checked harness tasks of one evaluation.

    settings: the ``evaluation.lm_eval`` section.
    specs: what the harness loads, one per task in ``settings.tasks``: a task name it indexes, or
        a shipped task's inline config (:func:`shipped_task_config`).
    manager: the harness's ``TaskManager`` over ``include_path`` (and its own tasks when one is used).
    """

    settings: LmEvalConfig
    specs: list[str | dict[str, Any]]
    manager: Any


def plan_benchmarks(settings: LmEvalConfig) -> BenchmarkPlan:
    """Check ``settings.tasks`` against the tasks the harness can load, before anything expensive runs.

    A name is looked up in ``settings.include_path`` first, then among the shipped tasks, then among
    the harness's own tasks (indexing those takes about 10 s, so it happens only when a name is not
    local). Raises ConfigError (one line naming ``evaluation.lm_eval.tasks`` and the local tasks) for
    a name none of them knows, and for an ``include_path`` that is not a folder.
    """
    from lm_eval.tasks import TaskManager

    include = settings.include_path
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"evaluation.lm_eval.include_path: {include} is not a folder of harness task YAML files")
    manager = TaskManager(include_path=include, include_defaults=False)
    user = set(manager.all_tasks)
    shipped = {name: path for name, path in shipped_tasks().items() if name not in user}
    missing = [t for t in settings.tasks if t not in user and t not in shipped]
    if missing:
        manager = TaskManager(include_path=include)
        unknown = [t for t in missing if t not in manager.all_tasks]
        if unknown:
            local = ", ".join(sorted({*user, *shipped}))
            raise ConfigError(
                f"evaluation.lm_eval.tasks: unknown task '{unknown[0]}' (local tasks: {local}; or one of the "
                f"harness's own, e.g. {', '.join(HUB_TASK_EXAMPLES)}, which need network)"
            )
    specs = [shipped_task_config(shipped[t]) if t in shipped else t for t in settings.tasks]
    return BenchmarkPlan(settings, specs, manager)


def metric_name(task: str, key: str, when: str) -> str:
    """The flat metric name of the harness's result ``key`` (``metric,filter``) of ``task``:
    ``lm_eval_<task>_<metric>[_<filter>]_<when>``, the filter left out when it is ``none``, every
    run of other characters than letters, digits and ``_`` made one ``_``
    (``acc,none`` of ``trace_mini_mc`` before: ``lm_eval_trace_mini_mc_acc_before``)."""
    metric, _, flt = key.partition(",")
    name = f"lm_eval_{task}_{metric}" + ("" if flt in ("", "none") else f"_{flt}") + f"_{when}"
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


@dataclass
class BenchmarkReport:
    """The harness's findings on the reference (before) and the realigned model (after).

    metrics: ``{metric_name(task, key, when): value}`` for every numeric ``metric,filter`` result of
        every task and group the harness reports (accuracies are fractions in [0, 1], stderrs
        included).
    results: ``{"before": ..., "after": ...}``, each the harness's results JSON cut to
        :data:`RESULT_KEYS`.
    """

    metrics: dict[str, float]
    results: dict[str, dict[str, Any]]


def run_benchmarks(model, tokenizer, plan: BenchmarkPlan, *, reference_model=None) -> BenchmarkReport:
    """Run the harness (``lm_eval.simple_evaluate``) on the reference and on the realigned ``model``.

    The reference is ``model`` with its LoRA adapter disabled, or ``reference_model`` after full
    fine-tuning (see :func:`~trace_realign.core.evaluation.generation.as_reference`). A
    multiple-choice task's ``acc`` is the share of questions whose correct choice has the highest
    log-likelihood (the sum of its tokens' log-probabilities after the question), as the harness
    defines it. Raises TraceError when ``model`` has no adapter and no ``reference_model`` is given.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    settings = plan.settings
    metrics: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    for when, models in (("before", as_reference(model, reference_model)), ("after", nullcontext(model))):
        with models as m, eval_mode(m):
            out = simple_evaluate(
                model=HFLM(pretrained=m, tokenizer=tokenizer, batch_size=settings.batch_size),
                tasks=plan.specs, task_manager=plan.manager, limit=settings.limit,
                num_fewshot=settings.num_fewshot, log_samples=False,
            )  # fmt: skip
        kept = json.loads(json.dumps({k: out[k] for k in RESULT_KEYS if k in out}, default=handle_non_serializable))
        results[when] = kept
        for task, values in kept["results"].items():
            for key, value in values.items():
                if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[metric_name(task, key, when)] = float(value)
    return BenchmarkReport(metrics, results)
