"""One comparison table over methods trained on the same triaged pairs and evaluated on the same
held-out prompts: each metric's mean over seeds with a 95% confidence interval.

The rows are the starting model (the evaluate stage's ``*_before`` values, the same for every
method since its generations do not depend on the method) and one row per method and oracle-noise
rate (``*_after`` values and the metrics that compare the realigned model with the starting one).
The interval is Student's t: ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample
standard deviation over the ``n`` seeds; one seed gives no interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Metrics of the realigned model measured against the starting one (no "before" value).
PAIRED_METRICS = ("utility_ratio", "win_rate", "tie_rate", "loss_rate", "h2h_win_rate", "h2h_tie_rate", "h2h_loss_rate")
# Before/after metrics that describe the evaluation rather than a model's quality.
_NOT_COMPARED = ("n_unknown", "labelled_coverage", "generation_seconds", "judge_seconds")
# Counts and standard errors that come with a metric (asr_<wrapper>_n_unknown, lm-eval's *_stderr).
_COUNTS = ("_n", "_n_unknown", "_stderr")
# The order of the columns people look for first; any other metric follows alphabetically.
_FIRST = (
    "tpa", "labelled_tpa", "utility_ratio", "win_rate", "tie_rate", "loss_rate",
    "h2h_win_rate", "h2h_tie_rate", "h2h_loss_rate", "seq_rep_4", "distinct_2",
)

STARTING_MODEL = "starting model"


@dataclass(frozen=True)
class Interval:
    """A metric over seeds: ``mean``, the 95% interval's ``half_width`` (None for one seed), ``n`` seeds."""

    mean: float
    half_width: float | None
    n: int

    def text(self, digits: int = 2) -> str:
        """``"62.96 +- 3.10"`` (or ``"62.96"`` for one seed)."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` and the half-width of its two-sided Student-t confidence interval
    ``t_{(1+confidence)/2, n-1} * s / sqrt(n)`` (``s``: the sample standard deviation, n-1 in the
    denominator). Raises ValueError for no values or a confidence outside (0, 1)."""
    if not values:
        raise ValueError("interval of no values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, None, 1)
    from scipy.stats import t

    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(t.ppf((1 + confidence) / 2, n - 1)) * s / math.sqrt(n), n)


def compared_metrics(metrics: Iterable[str]) -> list[str]:
    """The table's columns from an evaluate stage's metric names: every ``X`` with an ``X_after``
    (per-group ``a/b`` names and bookkeeping counts left out) and the :data:`PAIRED_METRICS`
    present, the familiar ones first."""
    names = set(metrics)
    found = {
        base
        for k in names
        if k.endswith("_after")
        and "/" not in (base := k[: -len("_after")])
        and not base.startswith(_NOT_COMPARED)
        and not base.endswith(_COUNTS)
    }
    found |= {k for k in PAIRED_METRICS if k in names}
    return [k for k in _FIRST if k in found] + sorted(found - set(_FIRST))


@dataclass
class ComparisonRow:
    """One row: a method at one oracle-noise rate (or the starting model), each metric over seeds,
    and what it trained on (``samples`` and optimizer ``steps``, per seed; equal across seeds)."""

    method: str
    noise_rate: float | None
    metrics: dict[str, Interval]
    seeds: list[int]
    samples: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    by_group: dict[str, Interval] = field(default_factory=dict)


@dataclass
class Variant:
    """One realign run of a comparison: its method, noise rate and seed, its evaluate stage's
    metrics, the training samples and optimizer steps it trained for."""

    method: str
    noise_rate: float | None
    seed: int
    metrics: Mapping[str, Any]
    samples: int | None = None
    steps: int | None = None


def _numbers(variants: Sequence[Variant], key: str) -> list[float]:
    return [float(v.metrics[key]) for v in variants if isinstance(v.metrics.get(key), (int, float))]


def comparison_rows(variants: Sequence[Variant], confidence: float = 0.95) -> tuple[list[str], list[ComparisonRow]]:
    """``(columns, rows)``: the starting model's row (its ``*_before`` values over every variant:
    they are the same generations, so the interval is 0 unless the judge is not deterministic)
    followed by one row per (method, noise rate) in first-seen order, each metric's
    :func:`interval` over that row's seeds, and TPA per group (``tpa_after/<group>``) in
    ``by_group``. A metric a variant did not report is left out of its row's intervals.
    Raises ValueError when ``variants`` is empty."""
    if not variants:
        raise ValueError("no runs to compare")
    columns = compared_metrics(k for v in variants for k in v.metrics)
    start: dict[str, Interval] = {}
    for col in columns:
        values = _numbers(variants, f"{col}_before")
        if values:
            start[col] = interval(values, confidence)
    groups = sorted({k.split("/", 1)[1] for v in variants for k in v.metrics if k.startswith("tpa_before/")})
    rows = [
        ComparisonRow(
            STARTING_MODEL, None, start, sorted({v.seed for v in variants}),
            by_group={g: interval(vals, confidence) for g in groups if (vals := _numbers(variants, f"tpa_before/{g}"))},
        )
    ]
    keys: list[tuple[str, float | None]] = []
    for v in variants:
        if (v.method, v.noise_rate) not in keys:
            keys.append((v.method, v.noise_rate))
    for method, rate in keys:
        mine = [v for v in variants if v.method == method and v.noise_rate == rate]
        metrics = {}
        for col in columns:
            values = _numbers(mine, col if col in PAIRED_METRICS else f"{col}_after")
            if values:
                metrics[col] = interval(values, confidence)
        rows.append(
            ComparisonRow(
                method, rate, metrics, [v.seed for v in mine],
                samples=[v.samples for v in mine if v.samples is not None],
                steps=[v.steps for v in mine if v.steps is not None],
                by_group={g: interval(vals, confidence) for g in groups if (vals := _numbers(mine, f"tpa_after/{g}"))},
            )
        )
    return columns, rows


def _counts(values: Sequence[int]) -> str:
    distinct = sorted(set(values))
    return "" if not distinct else "/".join(str(v) for v in distinct)


def markdown_table(columns: Sequence[str], rows: Sequence[ComparisonRow], note: str = "") -> str:
    """The comparison as a Markdown table (method, noise, each metric as ``mean ± half-width``,
    training samples and optimizer steps), with ``note`` (what "equal data" meant) under it."""
    with_noise = any(r.noise_rate is not None for r in rows)
    head = ["method", *(["oracle noise"] if with_noise else []), "seeds", *columns, "samples", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.method]
        if with_noise:
            cells.append("" if r.noise_rate is None else f"{r.noise_rate:g}")
        cells.append(str(len(r.seeds)) if r.method != STARTING_MODEL else "")
        cells += [r.metrics[c].text(3 if abs(r.metrics[c].mean) < 10 else 2) if c in r.metrics else "" for c in columns]
        cells += [_counts(r.samples), _counts(r.steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{note}\n" if note else "\n")


def rows_as_json(columns: Sequence[str], rows: Sequence[ComparisonRow]) -> dict[str, Any]:
    """The table as JSON: ``{"columns": [...], "rows": [{method, noise_rate, seeds, samples,
    steps, metrics: {col: {mean, half_width, n}}, tpa_by_group: {...}}]}``."""
    def iv(i: Interval) -> dict[str, Any]:
        return {"mean": i.mean, "half_width": i.half_width, "n": i.n}

    return {
        "columns": list(columns),
        "rows": [
            {
                "method": r.method, "noise_rate": r.noise_rate, "seeds": r.seeds, "samples": r.samples, "steps": r.steps,
                "metrics": {k: iv(v) for k, v in r.metrics.items()},
                "tpa_by_group": {k: iv(v) for k, v in r.by_group.items()},
            }
            for r in rows
        ],
    }
