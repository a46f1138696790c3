"""Judge quality: agreement of a judge's verdicts with reference labels, and the unknown-share stop.

Labels are "compliant" booleans; the positive class is compliant (True). Unknown predictions are
excluded from accuracy, kappa and the confusion matrix, and counted in ``n_unknown``.

:func:`check_unknown_share` stops a run whose judge could not answer more than a set share of its
questions (a reasoning judge cut at one token, a server that answers in prose), instead of
training on what is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.oracle.base import Verdict, clip


def judge_agreement(predicted: Sequence[bool | None], reference: Sequence[bool]) -> dict[str, float | int | None]:
    """Agreement between predicted and reference compliance labels.

    Over the n_known pairs whose prediction is not None:
    accuracy = (tp + tn) / n_known;
    Cohen's kappa = (p_o - p_e) / (1 - p_e) with p_o = accuracy and
    p_e = P(pred=T) P(ref=T) + P(pred=F) P(ref=F).
    accuracy and kappa are None when nothing is known; kappa is None when p_e = 1 (both sides give
    one single label, where kappa is undefined).
    Returns {n, n_known, n_unknown, accuracy, cohen_kappa, tp, fp, fn, tn}.
    """
    if len(predicted) != len(reference):
        raise DataError(f"judge agreement: {len(predicted)} predictions but {len(reference)} reference labels")
    for i, ref in enumerate(reference):
        if not isinstance(ref, bool):
            raise DataError(f"judge agreement: reference label {i} is {ref!r}, expected true or false")
    tp = fp = fn = tn = 0
    for pred, ref in zip(predicted, reference):
        if pred is None:
            continue
        if pred and ref:
            tp += 1
        elif pred and not ref:
            fp += 1
        elif not pred and ref:
            fn += 1
        else:
            tn += 1
    n_known = tp + fp + fn + tn
    accuracy = kappa = None
    if n_known:
        accuracy = (tp + tn) / n_known
        pred_true = (tp + fp) / n_known
        ref_true = (tp + fn) / n_known
        expected = pred_true * ref_true + (1 - pred_true) * (1 - ref_true)
        if expected < 1.0:
            kappa = (accuracy - expected) / (1 - expected)
    return {
        "n": len(predicted),
        "n_known": n_known,
        "n_unknown": len(predicted) - n_known,
        "accuracy": accuracy,
        "cohen_kappa": kappa,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


VerdictTriple = tuple[bool | None, str | None, str | None]  # (compliant, raw answer, reason)


def verdict_triples(rows: Iterable[Mapping[str, Any]]) -> list[VerdictTriple]:
    """(compliant, raw, reason) of both responses of verdict rows (the judge stage's Parquet
    columns ``chosen_compliant, chosen_raw, chosen_reason`` and the ``rejected_`` ones), chosen
    then rejected per row, for :func:`check_unknown_share`."""
    out: list[VerdictTriple] = []
    for row in rows:
        for side in ("chosen", "rejected"):
            out.append((row.get(f"{side}_compliant"), row.get(f"{side}_raw"), row.get(f"{side}_reason")))
    return out


def check_unknown_share(
    verdicts: Iterable[VerdictTriple | Verdict], judge: str, max_share: float, setting: str = "oracle"
) -> dict[str, float | int]:
    """Stop when more than ``max_share`` (0..1; 1 disables the check) of ``verdicts`` are unknown.

    ``verdicts`` holds (compliant, raw answer, reason) triples or :class:`Verdict` objects; ``judge``
    is the judge's identity and ``setting`` the config section its settings live in. Returns
    {n, n_unknown, unknown_share} when within the limit (unknown_share 0.0 for no verdicts). Raises
    TraceError, one line: the judge, "N of M verdicts unknown (x% > limit%)", one unknown's raw answer
    (clipped, repr) and reason, and what to do.
    """
    n = n_unknown = 0
    example: VerdictTriple | None = None
    for v in verdicts:
        compliant, raw, reason = (v.compliant, v.raw, v.reason) if isinstance(v, Verdict) else v
        n += 1
        if compliant is None:
            n_unknown += 1
            if example is None or (not example[1] and raw):
                example = (compliant, raw, reason)  # the first unknown, or the first with a raw answer
    share = n_unknown / n if n else 0.0
    if max_share < 1.0 and share > max_share and example is not None:
        _, raw, reason = example
        why = " ".join((reason or "no reason given").split())
        raise TraceError(
            f"judge {judge}: {n_unknown} of {n} verdicts unknown ({100 * share:.1f}% > {100 * max_share:g}%); "
            f"e.g. the answer {clip(raw or '', 160)!r}: {clip(why, 240)}. Fix the judge or its settings, or raise "
            f"{setting}.max_unknown_share (1 disables this check); a rerun asks an LLM judge's unknown verdicts "
            f"again (--fresh judge: all of them)"
        )
    return {"n": n, "n_unknown": n_unknown, "unknown_share": share}
