"""The pipeline's configuration file: one YAML file of sections, validated once.

``--set key=value`` overrides take YAML values (``--set training.max_steps=5``,
``--set training.lora.target_modules=[q_proj]``). A relative input path in a config file (data,
policy, model folder, gold pairs, prompts, labels, judge models) names a file beside the config
file when one is there, else in the working folder the run starts in; a path given with ``--set``
is relative to the working folder. ``--config demo`` (or ``smoke``) names a config that ships
with the package. The method's sections are :mod:`trace_realign.core.config`'s; the run and MLflow
sections are the orchestration's, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from trace_realign.core.config import (
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    PolicyConfig,
    ReferenceTrainingConfig,
    Section,
    TrainingConfig,
    TriageConfig,
    WeightsConfig,
    marked_settings,
)
from trace_realign.core.errors import ConfigError, describe_validation_errors
from trace_realign.core.oracle.config import BACKENDS, JudgeConfig
from trace_realign.core.resources import SHIPPED_ROOT


class RunConfig(Section):
    """The run: its name (the MLflow run name and registered model's base), working folder and seed."""

    name: str = "trace-realign"
    workdir: str = Field(".trace", description="artifacts, caches, Prefect results and the MLflow store")
    seed: int = 0


class ApprovalConfig(Section):
    """The approval gate: a run stops after triage (and the policy diff) until a person approves."""

    required: bool = Field(False, description="pause after triage until approved in the Prefect UI or with trace-realign approve (run/watch --approval)")
    timeout_s: float = Field(86400.0, gt=0, description="seconds to wait for a decision; then the run ends, nothing trained")
    poll_s: float = Field(10.0, gt=0, description="seconds between the paused run's checks for a decision")


class MLflowConfig(Section):
    """Where runs are tracked and whether the realigned model is registered."""

    tracking_uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db")
    experiment: str = "trace-realign"
    register_model: bool = True
    registered_model_name: str | None = None


class PipelineConfig(Section):
    """A whole config file: the method's sections (:mod:`trace_realign.core.config`) with the run's."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    policy: PolicyConfig
    oracle: JudgeConfig
    triage: TriageConfig = Field(default_factory=TriageConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)

    @field_validator("oracle", mode="before")
    @classmethod
    def _backend_first(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("backend") not in BACKENDS:
            raise ValueError(f"oracle.backend must be one of {', '.join(BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _fallback_has_a_threshold(self):
        if self.oracle.fallback is not None and self.triage.min_confidence is None:
            raise ValueError(
                "oracle.fallback is asked only for verdicts below triage.min_confidence: set triage.min_confidence "
                "(e.g. 0.8), or remove oracle.fallback"
            )
        return self

    def warnings(self) -> list[str]:
        """Lines about settings that are valid but will do nothing (printed before a run starts):
        ``triage.min_confidence`` under a judge that never gives a confidence (the annotations judge)."""
        out = []
        judges = [self.oracle] + ([self.oracle.fallback] if self.oracle.fallback is not None else [])
        if self.triage.min_confidence is not None and all(j.backend == "annotations" for j in judges):
            out.append(
                "triage.min_confidence: the annotations judge gives no confidences, so no verdict is routed to "
                "UNKNOWN (the triage stage counts them as triage_no_confidence)"
            )
        if self.weights.confidence and all(j.backend == "annotations" for j in judges):
            out.append("weights.confidence: the annotations judge gives no confidences, so every sample keeps its weight")
        return out

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data (for cache keys and MLflow params)."""
        value = getattr(self, name)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _locate(name: str, folder: Path, missing: str) -> Path:
    """The YAML file ``name``, else the shipped ``folder/<name>.yaml`` (``name`` with or without
    ``.yaml``); else ConfigError ``missing`` with ``{names}`` filled by the shipped names."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith(".yaml") else name
    shipped = folder / f"{stem}.yaml"
    if stem and "/" not in stem and "\\" not in stem and shipped.is_file():
        return shipped
    raise ConfigError(missing.format(names=", ".join(sorted(p.stem for p in folder.glob("*.yaml")))))


def _read_sections(path: Path, where: str) -> dict:
    """A YAML file of sections; invalid YAML or another shape is one ConfigError naming ``where``."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: invalid YAML{at}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections")
    return tree


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for every non-mapping value of ``tree`` (a preset sets single settings,
    so a config's other settings in the same section stay)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _set(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: cannot set '{dotted}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path, overrides: list[str] | None = None, presets: Sequence[str] = ()) -> PipelineConfig:
    """Read, override and validate a config file; problems raise one-line ConfigError naming the setting.

    ``path`` is a YAML file, or the name of a config shipped with the package (``demo``, ``smoke``).
    Relative input paths written in the file are looked up beside it first (see the module docstring).
    ``presets`` (a shipped name such as ``paper``, or a YAML file of sections) are laid over the
    file's settings in order, and ``overrides`` over them.
    """
    p = _locate(str(path), SHIPPED_ROOT / "configs", f"{path}: config file not found (configs shipped with the package: {{names}})")
    tree = _read_sections(p, str(path))
    for preset in presets:
        found = _locate(preset, SHIPPED_ROOT / "configs" / "presets", f"--preset {preset}: no such preset (shipped presets: {{names}})")
        for key, value in _leaves(_read_sections(found, f"--preset {preset}")):
            _set(tree, key, value, f"--preset {preset}")
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        _set(tree, key, value, str(path))
    cfg = validate_config(tree, str(path))
    beside = paths_beside(cfg, p.resolve().parent, overridden=[key for key, _ in parsed])
    if not beside:
        return cfg
    for key, value in beside.items():
        _set(tree, key, value, str(path))
    return validate_config(tree, str(path))


def paths_beside(cfg: PipelineConfig, folder: Path, overridden: Sequence[str] = ()) -> dict[str, str]:
    """``{setting: absolute path}`` for every relative local-path setting that names an existing file
    or folder under ``folder`` (the config file's). Settings under an ``overridden`` key (given with
    ``--set``) and values with no such file (a known model name, a hub dataset, a path meant for the
    working folder) are left out."""
    out = {}
    for dotted, value in marked_settings(cfg, ("input_file", "local_path")):
        if any(dotted == k or dotted.startswith(k + ".") for k in overridden) or Path(value).is_absolute():
            continue
        candidate = folder / value
        if candidate.exists():
            out[dotted] = str(candidate.resolve())
    return out


def validate_config(tree: dict, where: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + describe_validation_errors(exc.errors(), "", drop=BACKENDS)) from None


# --- trace-realign compare's arguments (checked before Prefect is imported) ---------------------

METHODS: tuple[str, ...] = get_args(ReferenceTrainingConfig.model_fields["method"].annotation)


def check_methods(methods: list[str]) -> list[str]:
    """``methods`` without repeats, in order. Raises ConfigError naming an unknown one (and the
    known ones) or for an empty list."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method '{unknown[0]}' (methods: {', '.join(METHODS)})")
    if not methods:
        raise ConfigError(f"--methods: name at least one method (methods: {', '.join(METHODS)})")
    return list(dict.fromkeys(methods))


def check_noise_rates(rates: list[float] | None) -> list[float] | None:
    """``rates`` without repeats, in order (None: no noise study). Raises ConfigError for a rate
    outside [0, 1]."""
    if rates is None:
        return None
    for r in rates:
        if not 0 <= r <= 1:
            raise ConfigError(f"--noise-rates: {r:g} is not a share in [0, 1]")
    return list(dict.fromkeys(rates))
