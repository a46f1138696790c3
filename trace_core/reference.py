"""The reference stage: everything computed once at theta_ref before training.

From the triaged pairs: the training samples, the gold batch, ``g_F``, the exact impact score
and weight of every conflict sample, and the reference log-probs the losses need, the last two
from one shared batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from trace_realign.core.impact import (
    GoldPair,
    build_gold_batch,
    gold_gradient,
    gold_samples,
    impact_scores,
    impact_weights,
    reference_logps,
)
from trace_realign.core.objective import PunishForm, Sample, SampleKind, build_samples
from trace_realign.core.tokenization import Encoder
from trace_realign.core.triage import TriagedPair, TriageType


@dataclass
class ReferenceSettings:
    beta: float = 0.3
    punish_form: PunishForm = "trace"
    gold_size: int = 64
    seed: int = 0
    batch_size: int = 8
    use_triage: bool = True
    use_kl: bool = True
    use_impact_weights: bool = True
    use_corrections: bool = False


@dataclass
class ReferenceOutput:
    samples: list[Sample]  # with weight (sum-normalised over conflict samples) and ref_logps set
    scores: dict[str, float]  # pair_id -> raw impact score s_i (conflict samples; empty without weighting)
    gold: list[GoldPair]
    stats: dict = field(default_factory=dict)


def compliant_pool(triaged: Sequence[TriagedPair]) -> list[str]:
    """Responses the oracle judged compliant: the candidates for PUNISH prompts' gold pairs."""
    pool = []
    for t in triaged:
        if t.chosen_compliant is True:
            pool.append(t.pair.chosen)
        if t.rejected_compliant is True:
            pool.append(t.pair.rejected)
    return pool


def run_reference_stage(
    model,
    tokenizer,
    triaged: Sequence[TriagedPair],
    encoder: Encoder,
    settings: ReferenceSettings,
    user_gold: Sequence[GoldPair] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ReferenceOutput:
    """Build samples and compute their weights and reference log-probs at theta_ref.

    ``model`` is at theta_ref: the base model with the initial LoRA adapter (B = 0, so the
    adapter changes nothing yet) or the base model itself under full fine-tuning.
    ``progress(stage, done, total)`` is called as batches finish.
    """
    samples = build_samples(
        triaged, encoder, use_triage=settings.use_triage, use_kl=settings.use_kl, use_corrections=settings.use_corrections
    )
    conflict_idx = [i for i, s in enumerate(samples) if s.kind != SampleKind.RETAIN]
    conflict = [samples[i] for i in conflict_idx]
    pad = tokenizer.pad_token_id

    def reporter(stage, total):
        done = [0]

        def step(n):
            done[0] += n
            if progress:
                progress(stage, done[0], total)

        return step

    gold: list[GoldPair] = []
    scores: dict[str, float] = {}
    if settings.use_impact_weights and conflict:
        if user_gold:
            gold = list(user_gold)
        else:
            by_type = {k: [t.pair for t in triaged if t.type is k] for k in TriageType}
            gold = build_gold_batch(
                by_type[TriageType.RETAIN],
                by_type[TriageType.INVERT],
                by_type[TriageType.PUNISH],
                compliant_pool(triaged),
                size=settings.gold_size,
                seed=settings.seed,
            )
        g_f = gold_gradient(
            model, gold_samples(gold, encoder), settings.beta, pad, settings.batch_size, reporter("gold", len(gold))
        )
        result = impact_scores(
            model,
            conflict,
            g_f,
            settings.beta,
            pad,
            settings.punish_form,
            settings.batch_size,
            reporter("scores", len(conflict)),
        )
        weights = impact_weights(result.scores)
        ref = result.ref_logps
        scores = {s.pair_id: float(v) for s, v in zip(conflict, result.scores)}
    else:
        ref = reference_logps(model, conflict, pad, settings.batch_size, reporter("reference", len(conflict)))
        weights = torch.full((len(conflict),), 1.0 / max(1, len(conflict)), dtype=torch.float64)
    out = list(samples)
    for j, i in enumerate(conflict_idx):
        out[i] = replace(samples[i], weight=float(weights[j]), ref_logps=(float(ref[j, 0]), float(ref[j, 1])))
    for i, s in enumerate(out):
        if s.kind == SampleKind.RETAIN:
            out[i] = replace(s, weight=0.0)
    stats = {
        "conflict_samples": len(conflict),
        "retain_samples": len(samples) - len(conflict),
        "gold_size": len(gold),
        "positive_scores": int(sum(1 for v in scores.values() if v > 0)),
        **encoder.stats.as_dict(),
    }
    return ReferenceOutput(out, scores, gold, stats)
