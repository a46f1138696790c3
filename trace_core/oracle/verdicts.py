"""The judge stage's verdict table: both responses' verdicts per pair, and triage read back from it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from trace_realign.core.data import PreferencePair
from trace_realign.core.oracle.base import Verdict
from trace_realign.core.triage import TriagedPair, triage_pairs

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


def triage_from_verdicts(pairs: Sequence[PreferencePair], rows: Iterable[Mapping[str, Any]]) -> list[TriagedPair]:
    """Triage ``pairs`` (arXiv 2511.02623, stage 1) from verdict-table ``rows`` joined by ``pair_id``;
    a pair without a row has unknown verdicts (UNKNOWN)."""
    by_id = {row["pair_id"]: row for row in rows}
    chosen = [by_id.get(p.pair_id, {}).get("chosen_compliant") for p in pairs]
    rejected = [by_id.get(p.pair_id, {}).get("rejected_compliant") for p in pairs]
    return triage_pairs(pairs, chosen, rejected)
