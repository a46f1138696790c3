"""Stage 1 of TRACE: triage each old pair by the oracle's verdicts under the new policy.

| c_w | c_l | type   |
|-----|-----|--------|
| 0   | 1   | INVERT |
| 0   | 0   | PUNISH |
| 1   | any | RETAIN |

A verdict the oracle could not give (None) makes the pair UNKNOWN unless the other verdict
settles it: ``c_w = 1`` means RETAIN whatever ``c_l`` is.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

import pyarrow as pa

from trace_realign.core.data import PAIR_COLUMNS, PreferencePair, pairs_to_table, table_to_pairs


class TriageType(str, Enum):
    INVERT = "invert"
    PUNISH = "punish"
    RETAIN = "retain"
    UNKNOWN = "unknown"


TRAINABLE = (TriageType.INVERT, TriageType.PUNISH, TriageType.RETAIN)
CONFLICT = (TriageType.INVERT, TriageType.PUNISH)


def triage_pair(chosen_compliant: bool | None, rejected_compliant: bool | None) -> TriageType:
    """The triage type of one pair from the verdicts on its old winner and old loser."""
    if chosen_compliant is True:
        return TriageType.RETAIN
    if chosen_compliant is None or rejected_compliant is None:
        return TriageType.UNKNOWN
    return TriageType.INVERT if rejected_compliant else TriageType.PUNISH


def triage(
    chosen_compliant: Sequence[bool | None], rejected_compliant: Sequence[bool | None]
) -> list[TriageType]:
    """Triage types for aligned sequences of verdicts."""
    if len(chosen_compliant) != len(rejected_compliant):
        raise ValueError("triage: verdict sequences differ in length")
    return [triage_pair(c, r) for c, r in zip(chosen_compliant, rejected_compliant)]


def triage_counts(types: Iterable[TriageType]) -> dict[str, int]:
    """Counts per triage type (every type present, zeros included) and the total."""
    counts = Counter(TriageType(t) for t in types)
    out = {t.value: counts.get(t, 0) for t in TriageType}
    out["total"] = sum(counts.values())
    return out


@dataclass(frozen=True)
class TriagedPair:
    """A pair with its verdicts, its triage type and, for PUNISH, an optional oracle correction."""

    pair: PreferencePair
    type: TriageType
    chosen_compliant: bool | None
    rejected_compliant: bool | None
    correction: str | None = None


def relabelled(t: TriagedPair) -> tuple[str, str] | None:
    """(chosen, rejected) of a pair relabelled by its verdicts: an INVERT pair swapped (its old loser
    now wins), a PUNISH or RETAIN pair as it was; None for UNKNOWN (no verdict to relabel by)."""
    if t.type is TriageType.UNKNOWN:
        return None
    if t.type is TriageType.INVERT:
        return t.pair.rejected, t.pair.chosen
    return t.pair.chosen, t.pair.rejected


def triage_pairs(
    pairs: Sequence[PreferencePair],
    chosen_compliant: Sequence[bool | None],
    rejected_compliant: Sequence[bool | None],
    corrections: Sequence[str | None] | None = None,
) -> list[TriagedPair]:
    types = triage(chosen_compliant, rejected_compliant)
    corrections = corrections or [None] * len(pairs)
    return [
        TriagedPair(p, t, c, r, corr)
        for p, t, c, r, corr in zip(pairs, types, chosen_compliant, rejected_compliant, corrections)
    ]


def is_holdout(pair_id: str, fraction: float) -> bool:
    """Stable membership of the evaluation split: a hash of the pair id below ``fraction``."""
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def split_holdout(triaged: Sequence[TriagedPair], fraction: float) -> tuple[list[TriagedPair], list[TriagedPair]]:
    """``(train, holdout)``: the pairs :func:`is_holdout` keeps out of training, and the rest, each
    in input order."""
    train: list[TriagedPair] = []
    holdout: list[TriagedPair] = []
    for t in triaged:
        (holdout if is_holdout(t.pair.pair_id, fraction) else train).append(t)
    return train, holdout


TRIAGE_COLUMNS = [
    ("triage", pa.string()),
    ("chosen_compliant", pa.bool_()),
    ("rejected_compliant", pa.bool_()),
    ("correction", pa.string()),
]
"""The columns a triage shard adds to the pair columns (``triage/<type>-<k>-<sha8>.parquet``: the four types and ``holdout``)."""


def triaged_to_table(triaged: list[TriagedPair]) -> pa.Table:
    """Triaged pairs as a triage shard: the pair columns plus :data:`TRIAGE_COLUMNS`."""
    table = pairs_to_table([t.pair for t in triaged])
    for (name, typ), values in zip(
        TRIAGE_COLUMNS,
        (
            [t.type.value for t in triaged],
            [t.chosen_compliant for t in triaged],
            [t.rejected_compliant for t in triaged],
            [t.correction for t in triaged],
        ),
    ):
        table = table.append_column(pa.field(name, typ), pa.array(values, type=typ))
    return table


def table_to_triaged(table: pa.Table) -> list[TriagedPair]:
    """The triaged pairs of a triage shard (:func:`triaged_to_table`)."""
    pairs = table_to_pairs(table.select(list(PAIR_COLUMNS)))
    cols = table.select([n for n, _ in TRIAGE_COLUMNS]).to_pylist()
    return [
        TriagedPair(p, TriageType(c["triage"]), c["chosen_compliant"], c["rejected_compliant"], c["correction"])
        for p, c in zip(pairs, cols)
    ]
