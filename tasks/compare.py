"""The comparison report: one table (method x metric, mean and 95% interval over seeds) and its
plots from the realign runs of a ``trace-realign compare``, logged to the comparison's MLflow run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from trace_realign.core.evaluation.comparison import Variant, comparison_rows, markdown_table, rows_as_json
from trace_realign.tasks import plots, tracking
from trace_realign.tasks.artifacts import describe, write_json
from trace_realign.tasks.common import context_of


def _label(method: str, rate: float | None) -> str:
    return method if rate is None else f"{method} @ noise {rate:g}"


@task(name="compare-report", cache_policy=NO_CACHE)
def comparison_report(variants: list[dict], note: str, run: dict) -> dict:
    """Write the comparison table (``comparison-<sha8>.json`` and ``.md`` beside it) under the
    working folder's ``artifacts/compare`` and log both, the plots (one grouped bar chart per
    metric, TPA per evaluation group per method) and each row's means as metrics
    (``<method>[.noise_<rate>].<metric>``) to the run context's parent run (the comparison's run).
    ``variants`` are :class:`~trace_realign.core.evaluation.comparison.Variant` fields as dicts.
    Returns ``{"markdown", "table", "artifacts"}``."""
    ctx = context_of(run)
    columns, rows = comparison_rows([Variant(**v) for v in variants])
    table = {**rows_as_json(columns, rows), "note": note}
    markdown = markdown_table(columns, rows, note)
    folder = ctx.folder("artifacts", "compare")
    json_path = write_json(table, folder, "comparison")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown, encoding="utf-8")
    c = tracking.client(ctx.mlflow_uri)
    pid = ctx.parent_run_id
    c.log_artifact(pid, str(json_path), "comparison")
    c.log_artifact(pid, str(md_path), "comparison")
    metrics = {}
    for r in rows:
        prefix = r.method if r.noise_rate is None else f"{r.method}.noise_{r.noise_rate:g}"
        metrics.update({f"{prefix}.{k}": v.mean for k, v in r.metrics.items()})
    tracking.log_metrics(c, pid, metrics)
    noise = any(r.noise_rate is not None for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        for col in columns:
            values: dict[str, dict[str, float]] = {}
            errors: dict[str, dict[str, float]] = {}
            for r in rows:
                if col not in r.metrics:
                    continue
                # With a noise study, bars are grouped by noise rate (the starting model has none).
                category = (f"noise {r.noise_rate:g}" if r.noise_rate is not None else "no noise") if noise else col
                values.setdefault(r.method, {})[category] = r.metrics[col].mean
                errors.setdefault(r.method, {})[category] = r.metrics[col].half_width or 0.0
            if values:
                png = plots.grouped_bars(values, col, col, Path(tmp) / f"compare_{col}.png", errors)
                c.log_artifact(pid, str(png), "plots")
        groups = {_label(r.method, r.noise_rate): {g: i.mean for g, i in r.by_group.items()} for r in rows if r.by_group}
        if any(groups.values()):
            errors = {_label(r.method, r.noise_rate): {g: i.half_width or 0.0 for g, i in r.by_group.items()} for r in rows}
            png = plots.grouped_bars(groups, "TPA per evaluation group", "TPA (%)", Path(tmp) / "compare_tpa_by_group.png", errors)
            c.log_artifact(pid, str(png), "plots")
    c.set_tag(pid, "mlflow.note.content", markdown)
    return {"markdown": markdown, "table": table, "artifacts": {"table": describe(json_path), "markdown": describe(md_path)}}

