"""Stage 1 of TRACE: triage each old pair by the oracle's verdicts under the new policy.

| c_w | c_l | type   |
|-----|-----|--------|
| 0   | 1   | INVERT |
| 0   | 0   | PUNISH |
| 1   | any | RETAIN |

A verdict the oracle could not give (None) makes the pair UNKNOWN unless the other verdict
settles it: ``c_w = 1`` means RETAIN whatever ``c_l`` is. With a confidence threshold
(``triage.min_confidence``), a verdict whose confidence is below it counts as not given
(:func:`route_low_confidence`); a verdict without a confidence is kept as it is.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, replace
from enum import Enum
from typing import Iterable, Literal, Sequence

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
    """A pair with its verdicts, its triage type and, for PUNISH, an optional oracle correction.

    ``gold_chosen_compliant`` and ``gold_rejected_compliant`` are the verdicts of a stronger source
    than the oracle (the ``gold_dpo`` method's labels; None where there is none), never touched by
    oracle noise; ``noise`` names the noise applied to this pair's oracle verdicts (``flip``,
    ``swap``) or is None (:func:`apply_oracle_noise`). ``chosen_confidence`` and
    ``rejected_confidence`` are the judge's probabilities of its verdicts (None: the judge gave
    none), kept when :func:`route_low_confidence` made a verdict unknown."""

    pair: PreferencePair
    type: TriageType
    chosen_compliant: bool | None
    rejected_compliant: bool | None
    correction: str | None = None
    gold_chosen_compliant: bool | None = None
    gold_rejected_compliant: bool | None = None
    noise: str | None = None
    chosen_confidence: float | None = None
    rejected_confidence: float | None = None


def relabelled(t: TriagedPair) -> tuple[str, str] | None:
    """(chosen, rejected) of a pair relabelled by its verdicts: an INVERT pair swapped (its old loser
    now wins), a PUNISH or RETAIN pair as it was; None for UNKNOWN (no verdict to relabel by)."""
    if t.type is TriageType.UNKNOWN:
        return None
    if t.type is TriageType.INVERT:
        return t.pair.rejected, t.pair.chosen
    return t.pair.chosen, t.pair.rejected


def gold_view(t: TriagedPair) -> TriagedPair:
    """The pair triaged by its gold verdicts instead of the oracle's (INVERT, PUNISH, RETAIN or
    UNKNOWN by the table above), so :func:`relabelled` relabels it by the gold labels."""
    gold_c, gold_r = t.gold_chosen_compliant, t.gold_rejected_compliant
    return replace(t, type=triage_pair(gold_c, gold_r), chosen_compliant=gold_c, rejected_compliant=gold_r, noise=None)


def triage_pairs(
    pairs: Sequence[PreferencePair],
    chosen_compliant: Sequence[bool | None],
    rejected_compliant: Sequence[bool | None],
    corrections: Sequence[str | None] | None = None,
    *,
    gold: Sequence[tuple[bool | None, bool | None]] | None = None,
    noise: Sequence[str | None] | None = None,
    confidence: Sequence[tuple[float | None, float | None]] | None = None,
) -> list[TriagedPair]:
    """Triaged pairs from aligned verdict sequences; ``gold`` holds each pair's gold
    ``(chosen, rejected)`` verdicts, ``noise`` the noise applied to its oracle verdicts and
    ``confidence`` the ``(chosen, rejected)`` confidences of its verdicts (:class:`TriagedPair`),
    all None for every pair when not given."""
    types = triage(chosen_compliant, rejected_compliant)
    n = len(pairs)
    corrections = corrections or [None] * n
    gold = gold or [(None, None)] * n
    noise = noise or [None] * n
    confidence = confidence or [(None, None)] * n
    return [
        TriagedPair(p, t, c, r, corr, g[0], g[1], nz, conf[0], conf[1])
        for p, t, c, r, corr, g, nz, conf in zip(
            pairs, types, chosen_compliant, rejected_compliant, corrections, gold, noise, confidence
        )
    ]


def is_low_confidence(confidence: float | None, min_confidence: float | None) -> bool:
    """Whether a verdict with ``confidence`` falls below the threshold ``min_confidence``: never
    without a threshold or without a confidence (a judge that gives none is taken at its word)."""
    return min_confidence is not None and confidence is not None and confidence < min_confidence


def route_low_confidence(
    compliant: Sequence[bool | None], confidence: Sequence[float | None], min_confidence: float | None
) -> list[bool | None]:
    """``compliant`` [N] with every verdict below ``min_confidence`` (:func:`is_low_confidence`)
    made unknown (None), so :func:`triage_pair` treats it as a verdict the oracle could not give:
    INVERT and PUNISH pairs with such a verdict, and RETAIN pairs whose ``c_w`` is one, become
    UNKNOWN; a RETAIN pair whose ``c_l`` alone is low stays RETAIN. Raises ValueError when the
    sequences differ in length."""
    if len(compliant) != len(confidence):
        raise ValueError("route_low_confidence: verdict and confidence sequences differ in length")
    return [None if is_low_confidence(p, min_confidence) else c for c, p in zip(compliant, confidence)]


def confidence_stats(
    compliant: Sequence[tuple[bool | None, bool | None]],
    confidence: Sequence[tuple[float | None, float | None]],
    min_confidence: float | None,
) -> dict[str, int]:
    """What a confidence threshold does to N pairs' ``(chosen, rejected)`` verdicts ``compliant``
    [N] (before routing) with their ``confidence`` [N]: ``low_confidence`` (known verdicts below
    ``min_confidence``), ``no_confidence`` (known verdicts without a confidence, never routed: when
    it equals the known verdicts, the threshold did nothing) and ``low_confidence_unknown`` (pairs
    whose triage type became UNKNOWN by the routing)."""
    flat = [(c, p) for pair_c, pair_p in zip(compliant, confidence) for c, p in zip(pair_c, pair_p)]
    before = triage([c for c, _ in compliant], [r for _, r in compliant])
    chosen = route_low_confidence([c for c, _ in compliant], [p for p, _ in confidence], min_confidence)
    rejected = route_low_confidence([r for _, r in compliant], [p for _, p in confidence], min_confidence)
    after = triage(chosen, rejected)
    return {
        "low_confidence": sum(c is not None and is_low_confidence(p, min_confidence) for c, p in flat),
        "no_confidence": sum(c is not None and p is None for c, p in flat),
        "low_confidence_unknown": sum(b is not TriageType.UNKNOWN and a is TriageType.UNKNOWN for b, a in zip(before, after)),
    }


NoiseMode = Literal["flip", "swap", "mixed"]

_CATEGORY_VERDICTS = {TriageType.INVERT: (False, True), TriageType.PUNISH: (False, False)}


@dataclass(frozen=True)
class NoisyVerdicts:
    """The oracle's verdicts after :func:`apply_oracle_noise`: ``chosen`` and ``rejected`` [N] and
    ``applied`` [N] (``flip``, ``swap`` or None per pair)."""

    chosen: list[bool | None]
    rejected: list[bool | None]
    applied: list[str | None]


def apply_oracle_noise(
    chosen_compliant: Sequence[bool | None],
    rejected_compliant: Sequence[bool | None],
    rate: float,
    mode: NoiseMode = "mixed",
    seed: int = 0,
) -> NoisyVerdicts:
    """Corrupt a seeded share of the oracle's verdicts before triage, in the two modes of the
    oracle-noise study of arXiv 2511.02623 (its robustness table).

    Exactly ``round(rate * K)`` of the K pairs with a triage type other than UNKNOWN are drawn
    (``random.Random(seed).sample``); each drawn pair, in input order, gets:

    - ``flip`` (category flip): the pair's triage type is reassigned to one of the two other types,
      chosen uniformly, by setting its verdicts to the fewest changes that give it: RETAIN
      ``c_w = 1`` (``c_l`` kept), INVERT ``(0, 1)``, PUNISH ``(0, 0)``.
    - ``swap`` (chosen/rejected swap): the pair's two verdicts are exchanged, i.e. read against the
      wrong responses, so an INVERT pair becomes RETAIN and a RETAIN pair with a violating loser
      becomes INVERT: the relabelled preference reverses. A pair whose verdicts agree is unchanged.
    - ``mixed``: flip or swap with probability 1/2 each, as the authors' noisy splits.

    Pure and deterministic: the same inputs and seed give the same result; ``rate = 0`` returns the
    verdicts unchanged. Raises ValueError for a rate outside [0, 1], an unknown mode, or sequences
    of different lengths.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if mode not in ("flip", "swap", "mixed"):
        raise ValueError(f"unknown noise mode '{mode}' (use flip, swap or mixed)")
    types = triage(chosen_compliant, rejected_compliant)
    chosen, rejected = list(chosen_compliant), list(rejected_compliant)
    applied: list[str | None] = [None] * len(types)
    known = [i for i, t in enumerate(types) if t is not TriageType.UNKNOWN]
    rng = random.Random(seed)
    drawn = sorted(rng.sample(known, round(rate * len(known))))
    for i in drawn:
        kind = mode if mode != "mixed" else ("flip" if rng.random() < 0.5 else "swap")
        if kind == "flip":
            target = rng.choice([t for t in (TriageType.INVERT, TriageType.PUNISH, TriageType.RETAIN) if t is not types[i]])
            chosen[i], rejected[i] = _CATEGORY_VERDICTS.get(target, (True, rejected[i]))
        else:
            chosen[i], rejected[i] = rejected[i], chosen[i]
        applied[i] = kind
    return NoisyVerdicts(chosen, rejected, applied)


def noise_stats(clean: Sequence[TriagedPair], noisy: Sequence[TriagedPair]) -> dict[str, int]:
    """What oracle noise did, from the same pairs triaged without and with it: ``noise_pairs``
    (pairs drawn), ``noise_flip`` and ``noise_swap`` (per mode) and ``noise_moved`` (pairs whose
    triage type changed; a swap of two agreeing verdicts changes nothing)."""
    applied = [t.noise for t in noisy]
    return {
        "noise_pairs": sum(a is not None for a in applied),
        "noise_flip": applied.count("flip"),
        "noise_swap": applied.count("swap"),
        "noise_moved": sum(c.type is not n.type for c, n in zip(clean, noisy)),
    }


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
    ("gold_chosen_compliant", pa.bool_()),
    ("gold_rejected_compliant", pa.bool_()),
    ("noise", pa.string()),
    ("chosen_confidence", pa.float64()),
    ("rejected_confidence", pa.float64()),
]
"""The columns a triage shard adds to the pair columns (``triage/<type>-<k>-<sha8>.parquet``: the
four types and ``holdout``): the triage type, the oracle's verdicts as triage used them (after any
noise, and null where ``triage.min_confidence`` made them unknown), the PUNISH correction, the gold
verdicts (null: none), the noise applied (null: none) and the verdicts' confidences (null: none)."""


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
            [t.gold_chosen_compliant for t in triaged],
            [t.gold_rejected_compliant for t in triaged],
            [t.noise for t in triaged],
            [t.chosen_confidence for t in triaged],
            [t.rejected_confidence for t in triaged],
        ),
    ):
        table = table.append_column(pa.field(name, typ), pa.array(values, type=typ))
    return table


def table_to_triaged(table: pa.Table) -> list[TriagedPair]:
    """The triaged pairs of a triage shard (:func:`triaged_to_table`; a shard written before the
    confidence columns existed reads with no confidences)."""
    pairs = table_to_pairs(table.select(list(PAIR_COLUMNS)))
    cols = table.select([n for n, _ in TRIAGE_COLUMNS if n in table.column_names]).to_pylist()
    return [
        TriagedPair(
            p, TriageType(c["triage"]), c["chosen_compliant"], c["rejected_compliant"], c["correction"],
            c["gold_chosen_compliant"], c["gold_rejected_compliant"], c["noise"],
            c.get("chosen_confidence"), c.get("rejected_confidence"),
        )  # fmt: skip
        for p, c in zip(pairs, cols)
    ]
