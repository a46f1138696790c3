"""What a policy change does to the old preference data, before any training.

Every pair is triaged twice (arXiv 2511.02623, stage 1): from the oracle's verdicts under the old
policy and under the new one. The diff is the triage matrix (old type -> new type, with counts),
the pairs that moved, grouped by what decided them, a few examples per movement, and an estimate
of what realigning on the new policy costs (samples and optimizer steps). Nothing here judges:
the verdict rows come from the judge stage (:data:`~trace_realign.core.oracle.verdicts.VERDICT_SCHEMA`).

"What decided a movement" is the new policy's verdict on the response whose verdict changed (the
old winner's when both did): the annotations judge names its rule there ("violates: refused a
prompt tagged ['ethical']"); an LLM judge that answers with a bare label gives no rule, and its
movements are grouped under :data:`NO_RULE`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_realign.core.data import PreferencePair
from trace_realign.core.oracle.base import prompt_text
from trace_realign.core.oracle.verdicts import triage_from_verdicts
from trace_realign.core.triage import TriageType, is_holdout, is_low_confidence

TYPES = [t.value for t in TriageType]
NO_RULE = "(the judge gave no rule or reason)"
SHORT_ANSWER_WORDS = 3
"""A verdict's raw text of at most this many words is a bare label ("Yes", "No", "Compliant"), not a rule."""


@dataclass(frozen=True)
class MovedPair:
    """One pair whose triage type differs between the policies.

    ``side`` is the response whose verdict decided the movement (``chosen``: the old winner,
    ``rejected``: the old loser); ``decided_by`` that response's verdict under the new policy (its
    rule or reason, or :data:`NO_RULE`)."""

    pair: PreferencePair
    old: str
    new: str
    side: str
    decided_by: str
    old_verdicts: tuple[bool | None, bool | None]
    new_verdicts: tuple[bool | None, bool | None]


@dataclass
class PolicyDiff:
    """``matrix[old][new]``: pairs per (old type, new type), every type present; ``moved``: the
    pairs whose type changed, in input order; ``total``: the pairs compared; ``new_types``: each
    pair's type under the new policy by ``pair_id``."""

    matrix: dict[str, dict[str, int]]
    moved: list[MovedPair] = field(default_factory=list)
    total: int = 0
    new_types: dict[str, str] = field(default_factory=dict)

    @property
    def new_counts(self) -> dict[str, int]:
        """Pairs per triage type under the new policy."""
        return {t: sum(self.matrix[o][t] for o in TYPES) for t in TYPES}

    @property
    def old_counts(self) -> dict[str, int]:
        """Pairs per triage type under the old policy."""
        return {t: sum(self.matrix[t].values()) for t in TYPES}

    def groups(self) -> list[tuple[tuple[str, str, str], list[MovedPair]]]:
        """Moved pairs grouped by ``(old, new, decided_by)``, largest group first (ties: in the
        order of :data:`TYPES`, then by rule text)."""
        by: dict[tuple[str, str, str], list[MovedPair]] = defaultdict(list)
        for m in self.moved:
            by[(m.old, m.new, m.decided_by)].append(m)
        return sorted(by.items(), key=lambda kv: (-len(kv[1]), TYPES.index(kv[0][0]), TYPES.index(kv[0][1]), kv[0][2]))


def decided_by(row: Mapping[str, Any] | None, side: str, min_confidence: float | None = None) -> str:
    """The rule or reason in one verdict-table row's ``<side>`` verdict: the reason of an unknown
    verdict (a confidence below ``min_confidence`` included), the raw answer when it says more than
    a bare label, else :data:`NO_RULE`."""
    if not row:
        return "no verdict (the pair was not judged)"
    if row.get(f"{side}_compliant") is not None and is_low_confidence(row.get(f"{side}_confidence"), min_confidence):
        return f"unknown: confidence below triage.min_confidence {min_confidence:g}"
    if row.get(f"{side}_compliant") is None:
        return f"unknown: {row.get(f'{side}_reason') or 'no reason given'}"
    raw = " ".join(str(row.get(f"{side}_raw") or "").split())
    return raw if len(raw.split()) > SHORT_ANSWER_WORDS else NO_RULE


def diff_triage(
    pairs: Sequence[PreferencePair],
    old_rows: Iterable[Mapping[str, Any]],
    new_rows: Iterable[Mapping[str, Any]],
    min_confidence: float | None = None,
) -> PolicyDiff:
    """Triage ``pairs`` [N] from their verdict rows under the old and the new policy (joined by
    ``pair_id``; a pair without a row is UNKNOWN) and compare; ``min_confidence``
    (``triage.min_confidence``) routes low-confidence verdicts to unknown under both, as the triage
    stage does.

    The deciding side of a moved pair is the old winner when its verdict changed, else the old
    loser (a pair can also move with unchanged verdicts only from or to UNKNOWN through the other
    side; the old winner is named then)."""
    old_by = {r["pair_id"]: r for r in old_rows}
    new_by = {r["pair_id"]: r for r in new_rows}
    old_t = triage_from_verdicts(pairs, old_by.values(), min_confidence=min_confidence)
    new_t = triage_from_verdicts(pairs, new_by.values(), min_confidence=min_confidence)
    matrix = {o: {n: 0 for n in TYPES} for o in TYPES}
    moved = []
    for p, o, n in zip(pairs, old_t, new_t):
        matrix[o.type.value][n.type.value] += 1
        if o.type is n.type:
            continue
        side = "rejected" if o.chosen_compliant == n.chosen_compliant and o.rejected_compliant != n.rejected_compliant else "chosen"
        moved.append(
            MovedPair(
                p, o.type.value, n.type.value, side, decided_by(new_by.get(p.pair_id), side, min_confidence),
                (o.chosen_compliant, o.rejected_compliant), (n.chosen_compliant, n.rejected_compliant),
            )
        )
    return PolicyDiff(matrix, moved, len(pairs), {p.pair_id: n.type.value for p, n in zip(pairs, new_t)})


def optimizer_steps(samples: int, per_device_batch_size: int, gradient_accumulation_steps: int, num_train_epochs: float,
                    max_steps: int = -1, num_processes: int = 1) -> int:
    """Optimizer steps of a training run on ``samples`` samples, as the transformers Trainer counts
    them: ``max_steps`` when positive, else ``ceil(epochs * max(1, ceil(batches / accumulation)))``
    with ``batches = ceil(samples / (per_device_batch_size * num_processes))`` (each process's
    dataloader; the last accumulation window may be short); 0 without samples."""
    if samples <= 0:
        return 0
    if max_steps > 0:
        return max_steps
    batches = math.ceil(samples / (per_device_batch_size * max(1, num_processes)))
    return math.ceil(num_train_epochs * max(1, math.ceil(batches / gradient_accumulation_steps)))


def realignment_cost(
    diff: PolicyDiff,
    *,
    holdout_fraction: float,
    method: str = "trace",
    use_kl: bool = True,
    per_device_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    num_processes: int = 1,
    corrections: bool = False,
    evaluation_prompts: int | None = None,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """What realigning on the new policy costs after this diff: ``(rows, numbers)``, the rows
    (label, value) for :func:`render_markdown` and the numbers for metrics.

    Training samples follow the split the triage stage makes (held-out pairs by
    :func:`~trace_realign.core.triage.is_holdout`, UNKNOWN pairs left out); TRACE trains one
    sample per INVERT and PUNISH pair and, with ``use_kl``, per RETAIN pair; the baselines
    (``method`` other than trace) train on every triaged pair without a RETAIN term (an estimate).
    Optimizer steps: :func:`optimizer_steps`. Judge requests still to pay: corrections, one per
    PUNISH pair with ``corrections``, and the evaluation judge's questions, two per evaluation
    prompt (the reference's and the realigned model's answer), both fewer where cached."""
    counts = Counter()
    held = 0
    for pair_id, new in diff.new_types.items():
        if is_holdout(pair_id, holdout_fraction):
            held += 1
        else:
            counts[new] += 1
    if method == "trace":
        samples = counts["invert"] + counts["punish"] + (counts["retain"] if use_kl else 0)
    else:
        samples = counts["invert"] + counts["punish"] + counts["retain"]
    steps = optimizer_steps(samples, per_device_batch_size, gradient_accumulation_steps, num_train_epochs, max_steps, num_processes)
    how = (
        f"max_steps {max_steps}" if max_steps > 0
        else f"{samples} samples / (batch {per_device_batch_size} x {num_processes} processes x accumulation "
        f"{gradient_accumulation_steps}) x {num_train_epochs:g} epochs"
    )
    rows = [
        ("training samples", f"{samples} ({counts['invert']} INVERT, {counts['punish']} PUNISH, "
         f"{counts['retain'] if (use_kl or method != 'trace') else 0} RETAIN; method {method})"),
        ("left out of training", f"{held} held out for evaluation, {counts['unknown']} UNKNOWN"),
        ("optimizer steps (estimate)", f"{steps} ({how})"),
        ("judge requests for triage", "none left: every verdict under the new policy is in the verdict cache"),
    ]
    numbers = {"training_samples": samples, "optimizer_steps": steps, "holdout_pairs": held}
    if corrections:
        rows.append(("oracle corrections still to write", f"up to {counts['punish']} (one per PUNISH pair; cached ones are free)"))
        numbers["corrections_max"] = counts["punish"]
    if evaluation_prompts:
        rows.append(("evaluation judge questions", f"up to {2 * evaluation_prompts} ({evaluation_prompts} prompts, answered by the reference and the realigned model)"))
        numbers["evaluation_questions_max"] = 2 * evaluation_prompts
    return rows, numbers


def _quote(text: str, limit: int) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _verdict_word(v: bool | None) -> str:
    return {True: "complies", False: "violates", None: "unknown"}[v]


def render_markdown(
    diff: PolicyDiff,
    *,
    old_policy: str,
    new_policy: str,
    judge: str,
    cost: Sequence[tuple[str, str]] = (),
    examples_per_movement: int = 2,
    max_groups: int = 12,
    quote_chars: int = 160,
) -> str:
    """The diff as a Markdown report: summary, triage matrix, movements by what decided them,
    examples (``examples_per_movement`` per old -> new movement, responses cut at ``quote_chars``)
    and the ``cost`` rows (label, value) given by the caller."""
    moved = len(diff.moved)
    share = moved / diff.total if diff.total else 0.0
    new = diff.new_counts
    lines = [
        f"# Policy diff: {old_policy} -> {new_policy}",
        "",
        f"{diff.total} pairs judged under both policies by `{judge}`. **{moved} pairs ({share:.0%}) change triage type**; "
        f"under the new policy {new['invert']} are INVERT, {new['punish']} PUNISH, {new['retain']} RETAIN and {new['unknown']} UNKNOWN.",
        "",
        "## Triage matrix",
        "",
        "Rows: the type under the old policy; columns: under the new one.",
        "",
        "| old \\ new | " + " | ".join(TYPES) + " | total |",
        "|---|" + "---:|" * (len(TYPES) + 1),
    ]
    for o in TYPES:
        row = diff.matrix[o]
        lines.append(f"| **{o}** | " + " | ".join(str(row[n]) for n in TYPES) + f" | {sum(row.values())} |")
    lines.append("| **total** | " + " | ".join(str(new[n]) for n in TYPES) + f" | {diff.total} |")
    lines += ["", "## What moved them", ""]
    groups = diff.groups()
    if not groups:
        lines.append("No pair changes type.")
    else:
        lines += ["| movement | decided by (the new policy's verdict on that response) | pairs |", "|---|---|---:|"]
        for (o, n, rule), members in groups[:max_groups]:
            side = Counter(m.side for m in members).most_common(1)[0][0]
            who = "old winner" if side == "chosen" else "old loser"
            lines.append(f"| {o} -> {n} | {who}: {_quote(rule, 120)} | {len(members)} |")
        if len(groups) > max_groups:
            rest = sum(len(m) for _, m in groups[max_groups:])
            lines.append(f"| (other movements) | {len(groups) - max_groups} more groups | {rest} |")
        lines += ["", "## Examples", ""]
        movements: dict[tuple[str, str], list[MovedPair]] = defaultdict(list)
        for m in diff.moved:
            movements[(m.old, m.new)].append(m)
        for (o, n), members in sorted(movements.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"### {o} -> {n} ({len(members)} pairs)")
            lines.append("")
            for m in members[:examples_per_movement]:
                lines.append(f"- pair `{m.pair.pair_id}`: *{_quote(prompt_text(m.pair.prompt), quote_chars)}*")
                for side, text, (ov, nv) in (
                    ("old winner", m.pair.chosen, (m.old_verdicts[0], m.new_verdicts[0])),
                    ("old loser", m.pair.rejected, (m.old_verdicts[1], m.new_verdicts[1])),
                ):
                    lines.append(f"  - {side}: \"{_quote(text, quote_chars)}\" ({_verdict_word(ov)} -> {_verdict_word(nv)})")
                lines.append(f"  - decided by: {_quote(m.decided_by, quote_chars)}")
            lines.append("")
    if cost:
        lines += ["## Cost of the realignment", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in cost]
    return "\n".join(lines).rstrip() + "\n"


def diff_summary(diff: PolicyDiff) -> dict[str, Any]:
    """The diff as JSON-ready data: ``matrix``, ``total``, ``moved`` (count), ``movements``
    (``old -> new`` -> count) and ``groups`` (old, new, decided_by, pairs, pair_ids)."""
    movements = Counter(f"{m.old} -> {m.new}" for m in diff.moved)
    return {
        "total": diff.total,
        "moved": len(diff.moved),
        "matrix": diff.matrix,
        "movements": dict(movements),
        "groups": [
            {"old": o, "new": n, "decided_by": rule, "pairs": len(ms), "pair_ids": [m.pair.pair_id for m in ms]}
            for (o, n, rule), ms in diff.groups()
        ],
    }


def render_triage_report(counts: Mapping[str, int], train_counts: Mapping[str, int], policy: str) -> str:
    """A Markdown report of one policy's triage (no previous policy to diff against): pairs per
    type in all and in the training split; what the approval gate shows without ``policy.previous``."""
    lines = [
        f"# Triage under {policy}",
        "",
        "No previous policy was given (policy.previous), so there is no diff: these are the pairs per triage type.",
        "",
        "| type | pairs | in training |",
        "|---|---:|---:|",
    ]
    lines += [f"| {t} | {counts.get(t, 0)} | {train_counts.get(t, 0)} |" for t in TYPES]
    lines.append(f"| **total** | {sum(counts.get(t, 0) for t in TYPES)} | {sum(train_counts.get(t, 0) for t in TYPES)} |")
    return "\n".join(lines) + "\n"
