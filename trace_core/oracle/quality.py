"""Judge quality: agreement of a judge's verdicts with reference labels.

Labels are "compliant" booleans; the positive class is compliant (True). Unknown predictions are
excluded from accuracy, kappa and the confusion matrix, and counted in ``n_unknown``.
"""

from __future__ import annotations

from collections.abc import Sequence

from trace_core.errors import DataError


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
