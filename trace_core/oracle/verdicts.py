"""The judge stage's verdict table: both responses' verdicts per pair, and triage read back from it
(with oracle noise, when configured, and the gold labels of the ``gold_dpo`` method)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from trace_realign.core.data import PreferencePair
from trace_realign.core.oracle.base import Verdict, judge_items, prompt_text
from trace_realign.core.policy import Policy
from trace_realign.core.triage import NoiseMode, TriagedPair, apply_oracle_noise, triage_pairs

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
        ("judge", pa.string()),  # the judge's identity
        ("policy_sha256", pa.string()),
    ]
)
"""One row per pair of a ``verdicts-<k>-<sha8>.parquet`` shard."""


def verdict_table(pairs: Sequence[PreferencePair], verdicts: Sequence[Verdict], judge: str, policy_sha256: str) -> pa.Table:
    """The verdict table of ``pairs`` from ``verdicts`` [2 * len(pairs)] (chosen then rejected per
    pair, as :func:`~trace_realign.core.oracle.base.judge_items` orders the questions). Raises
    ValueError when the lengths do not match."""
    if len(verdicts) != 2 * len(pairs):
        raise ValueError(f"verdict_table: {len(verdicts)} verdicts for {len(pairs)} pairs (expected {2 * len(pairs)})")
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
            }
        )
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)


def triage_from_verdicts(
    pairs: Sequence[PreferencePair],
    rows: Iterable[Mapping[str, Any]],
    *,
    gold: GoldVerdicts | None = None,
    noise: tuple[float, NoiseMode, int] | None = None,
) -> list[TriagedPair]:
    """Triage ``pairs`` (arXiv 2511.02623, stage 1) from verdict-table ``rows`` joined by ``pair_id``;
    a pair without a row has unknown verdicts (UNKNOWN).

    ``noise`` = ``(rate, mode, seed)`` corrupts the verdicts first
    (:func:`~trace_realign.core.triage.apply_oracle_noise`); the verdict table itself is never
    changed. ``gold`` (:data:`GoldVerdicts`, aligned with ``pairs``) is carried on each pair as it
    is, noise or not."""
    by_id = {row["pair_id"]: row for row in rows}
    chosen = [by_id.get(p.pair_id, {}).get("chosen_compliant") for p in pairs]
    rejected = [by_id.get(p.pair_id, {}).get("rejected_compliant") for p in pairs]
    if noise is None:
        return triage_pairs(pairs, chosen, rejected, gold=gold)
    noisy = apply_oracle_noise(chosen, rejected, *noise)
    return triage_pairs(pairs, noisy.chosen, noisy.rejected, gold=gold, noise=noisy.applied)


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
