"""Checks before a run starts, so bad input fails fast with one line and writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from trace_realign.flows.config import PipelineConfig
from trace_realign.core.errors import ConfigError, DataError
from trace_realign.core.policy import load_policy


def preflight(cfg: PipelineConfig) -> None:
    """The policy (and the previous one, if set) parses, the data file exists, the other files the config names exist, the
    labelled generations and gold labels (if any) were labelled under this policy."""
    policy = load_policy(cfg.policy.path)
    if cfg.policy.previous:
        if not Path(cfg.policy.previous).is_file():
            raise ConfigError(f"policy.previous: file not found: {cfg.policy.previous}")
        previous = load_policy(cfg.policy.previous)
        if cfg.oracle.backend == "annotations" and not previous.rules:
            raise ConfigError(
                f"policy.previous: {cfg.policy.previous} has no 'rules:' in its front matter, and the annotations judge needs them"
            )
    data = Path(cfg.data.path)
    looks_local = data.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or cfg.data.path.startswith((".", "/", "~"))
    if cfg.data.format != "hf" and looks_local and not data.exists():
        raise DataError(f"{cfg.data.path}: data file not found (data.path)")
    for setting, value in (
        ("weights.gold_path", cfg.weights.gold_path),
        ("evaluation.prompts_path", cfg.evaluation.prompts_path),
        ("evaluation.labels_path", cfg.evaluation.labels_path),
        ("triage.gold_labels_path", cfg.triage.gold_labels_path),
    ):
        if value and not Path(value).exists():
            raise ConfigError(f"{setting}: file not found: {value}")
    if cfg.evaluation.enabled and cfg.evaluation.prompts_path:
        from trace_realign.core.data import load_prompts

        load_prompts(cfg.evaluation.prompts_path)
    for setting, value in (
        ("evaluation.labels_path", cfg.evaluation.labels_path),
        ("triage.gold_labels_path", cfg.triage.gold_labels_path),
    ):
        if value:
            from trace_realign.core.evaluation import load_generation_labels

            load_generation_labels(value, policy, setting=setting)
    if cfg.evaluation.enabled and cfg.evaluation.lm_eval.tasks:
        from trace_realign.core.evaluation.benchmarks import plan_benchmarks

        plan_benchmarks(cfg.evaluation.lm_eval)
    check_names(cfg)
    for line in cfg.warnings():
        print(f"trace-realign: warning: {line}", file=sys.stderr)


def check_names(cfg: PipelineConfig) -> None:
    """Every name the run will send to MLflow that comes from the user is valid, or has a valid
    mapping: checked here, so a bad name never fails a run after its expensive stages."""
    from trace_realign.tasks import tracking

    tracking.check_experiment_name(cfg.mlflow.experiment)
    if cfg.mlflow.register_model:
        tracking.registered_model_name(cfg.run.name, cfg.mlflow.registered_model_name)
