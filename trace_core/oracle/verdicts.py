"""The judge stage's verdict table: both responses' verdicts per pair, and triage read back from it
(with oracle noise, when configured, and the gold labels of the ``gold_dpo`` method)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from trace_realign.core.data import PreferencePair
from trace_realign.core.oracle.base import Verdict, judge_items, prompt_text
from trace_realign.core.policy import Policy
from trace_realign.core.triage import NoiseMode, TriagedPair, apply_oracle_noise, route_low_confidence, triage_pairs

GoldVerdicts = list[tuple[bool | None, bool | None]]
"""Per pair, the gold ``(chosen, rejected)`` compliance under the new policy (None: no label)."""

VERDICT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("chosen_compliant", pa.bool_()),  # null: unknown
        ("rejected_compliant", pa.bool_()),
        ("chosen_confidence", pa.float64()),
        ("rejected_confidence", pa.float64()),
        ("chosen_reason", pa.string()),  # why a verdict is unknown
        ("rejected_reason", pa.string()),
        ("chosen_raw", pa.string()),  # the judge's answer as given
        ("rejected_raw", pa.string()),
        ("judge", pa.string()),  # the judge's identity (the oracle's, also where its fallback answered)
        ("policy_sha256", pa.string()),
        ("chosen_judge", pa.string()),  # the identity of the judge whose verdict this row holds
        ("rejected_judge", pa.string()),
    ]
)
"""One row per pair of a ``verdicts-<k>-<sha8>.parquet`` shard."""


def verdict_table(
    pairs: Sequence[PreferencePair],
    verdicts: Sequence[Verdict],
    judge: str,
    policy_sha256: str,
    judges: Sequence[str] | None = None,
) -> pa.Table:
    """The verdict table of ``pairs`` from ``verdicts`` [2 * len(pairs)] (chosen then rejected per
    pair, as :func:`~trace_realign.core.oracle.base.judge_items` orders the questions); ``judges``
    [2 * len(pairs)] names the judge that gave each verdict (default: ``judge`` for all, the
    oracle's identity; an ``oracle.fallback`` answer names the fallback's). Raises ValueError when
    the lengths do not match."""
    judges = list(judges) if judges is not None else [judge] * len(verdicts)
    if len(verdicts) != 2 * len(pairs):
        raise ValueError(f"verdict_table: {len(verdicts)} verdicts for {len(pairs)} pairs (expected {2 * len(pairs)})")
    if len(judges) != len(verdicts):
        raise ValueError(f"verdict_table: {len(judges)} judges for {len(verdicts)} verdicts")
    rows = []
    for i, p in enumerate(pairs):
        chosen, rejected = verdicts[2 * i], verdicts[2 * i + 1]
        rows.append(
            {
                "pair_id": p.pair_id,
                "chosen_compliant": chosen.compliant,
                "rejected_compliant": rejected.compliant,
                "chosen_confidence": chosen.confidence,
                "rejected_confidence": rejected.confidence,
                "chosen_reason": chosen.reason,
                "rejected_reason": rejected.reason,
                "chosen_raw": chosen.raw,
                "rejected_raw": rejected.raw,
                "judge": judge,
                "policy_sha256": policy_sha256,
                "chosen_judge": judges[2 * i],
                "rejected_judge": judges[2 * i + 1],
            }
        )
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)


def triage_from_verdicts(
    pairs: Sequence[PreferencePair],
    rows: Iterable[Mapping[str, Any]],
    *,
    gold: GoldVerdicts | None = None,
    noise: tuple[float, NoiseMode, int] | None = None,
    min_confidence: float | None = None,
) -> list[TriagedPair]:
    """Triage ``pairs`` (arXiv 2511.02623, stage 1) from verdict-table ``rows`` joined by ``pair_id``;
    a pair without a row has unknown verdicts (UNKNOWN).

    ``noise`` = ``(rate, mode, seed)`` corrupts the verdicts first
    (:func:`~trace_realign.core.triage.apply_oracle_noise`; a swap exchanges the two confidences
    with the verdicts, a flip keeps them); the verdict table itself is never changed. Then every
    verdict below ``min_confidence`` counts as unknown
    (:func:`~trace_realign.core.triage.route_low_confidence`). ``gold`` (:data:`GoldVerdicts`,
    aligned with ``pairs``) is carried on each pair as it is, noise or not."""
    chosen, rejected, confidence = verdict_columns(pairs, rows)
    applied = None
    if noise is not None:
        noisy = apply_oracle_noise(chosen, rejected, *noise)
        chosen, rejected, applied = noisy.chosen, noisy.rejected, noisy.applied
        confidence = [(r, c) if a == "swap" else (c, r) for (c, r), a in zip(confidence, noisy.applied)]
    chosen = route_low_confidence(chosen, [c for c, _ in confidence], min_confidence)
    rejected = route_low_confidence(rejected, [r for _, r in confidence], min_confidence)
    return triage_pairs(pairs, chosen, rejected, gold=gold, noise=applied, confidence=confidence)


def verdict_columns(
    pairs: Sequence[PreferencePair], rows: Iterable[Mapping[str, Any]]
) -> tuple[list[bool | None], list[bool | None], list[tuple[float | None, float | None]]]:
    """``(chosen [N], rejected [N], confidence [N])`` of the N ``pairs`` from verdict-table ``rows``
    joined by ``pair_id``: each pair's compliance verdicts and their ``(chosen, rejected)``
    confidences, None where the pair has no row."""
    by_id = {row["pair_id"]: row for row in rows}
    got = [by_id.get(p.pair_id, {}) for p in pairs]
    return (
        [r.get("chosen_compliant") for r in got],
        [r.get("rejected_compliant") for r in got],
        [(r.get("chosen_confidence"), r.get("rejected_confidence")) for r in got],
    )


def gold_from_labels(pairs: Sequence[PreferencePair], labels: Iterable[Any]) -> GoldVerdicts:
    """Gold verdicts from labelled responses (objects with ``prompt``, ``response``, ``compliant``,
    as :func:`~trace_realign.core.evaluation.labels.load_generation_labels` reads them), matched to
    each pair's responses by exact prompt and response text; a response without a label is None."""
    table = {(prompt_text(lab.prompt), lab.response): lab.compliant for lab in labels}
    return [(table.get((prompt_text(p.prompt), p.chosen)), table.get((prompt_text(p.prompt), p.rejected))) for p in pairs]


def gold_from_annotations(pairs: Sequence[PreferencePair], policy: Policy) -> GoldVerdicts | None:
    """Gold verdicts from the pairs' own annotations under ``policy``'s front-matter rules (the
    annotations judge); None when the policy has no rules or no pair carries annotations (there is
    no such source). Raises TraceError naming the policy file for rules that do not validate."""
    from trace_realign.core.oracle.annotations import AnnotationsJudge

    if not policy.rules or not any(p.chosen_annotations or p.rejected_annotations for p in pairs):
        return None
    verdicts = AnnotationsJudge().judge(judge_items(pairs), policy)
    return [(verdicts[2 * i].compliant, verdicts[2 * i + 1].compliant) for i in range(len(pairs))]
