"""One evaluation: generate with both models on held-out prompts, judge both, report TPA."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_realign.core.data import Prompt
from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.evaluation.generation import Generator, Progress, generate_reference_and_realigned
from trace_realign.core.evaluation.tpa import (
    DEFAULT_GROUP,
    group_name,
    significant_improvement,
    target_policy_agreement,
    tpa_by_group,
)
from trace_realign.core.oracle.base import Judge, JudgeItem, Verdict
from trace_realign.core.oracle.cache import VerdictCache, judge_with_cache
from trace_realign.core.policy import Policy


@dataclass
class EvaluationResult:
    """Generations, their verdicts and the metrics of one evaluation.

    rows: one dict per prompt: prompt, group, reference_response, realigned_response,
        reference_compliant, realigned_compliant (bool or None), reference_confidence,
        realigned_confidence, reference_reason, realigned_reason (why a verdict is unknown).
    metrics: flat numbers for a tracker: tpa_before, tpa_after (percentages), tpa_delta (percentage
        points), n, n_unknown_before, n_unknown_after, per group ``tpa_before/<group>``,
        ``tpa_after/<group>``, ``n/<group>``, timings in seconds (generation_seconds_reference,
        generation_seconds_realigned, judge_seconds), judge_requests, and with a judge accuracy:
        judge_accuracy (a fraction), judge_error_pp (percentage points), significant (1.0 or 0.0).
        Unknown values are left out.
    by_group: {group: {before: TPA dict, after: TPA dict}} (see :func:`target_policy_agreement`).
    judge: the judge's identity.
    judge_stats: the judging's request and unknown counts (:func:`judge_generations`).
    """

    rows: list[dict[str, Any]]
    metrics: dict[str, float]
    by_group: dict[str, dict[str, dict[str, float | int | None]]]
    judge: str
    judge_stats: dict[str, int] = field(default_factory=dict)


def judge_generations(
    judge: Judge,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    policy: Policy,
    *,
    cache: VerdictCache | None = None,
    progress: Progress | None = None,
) -> tuple[list[Verdict], dict[str, int]]:
    """Verdicts on generated responses (no annotations), through ``cache`` when given so an identical
    generation is judged once. Returns (verdicts, stats with requests and unknown counts). Raises
    TraceError for a judge that cannot read generated text (:attr:`Judge.reads_generated_text`)."""
    if not judge.reads_generated_text:
        raise TraceError(
            f"the {judge.backend} judge cannot judge generated text; configure an evaluation judge that "
            "reads it (an openai, vllm or transformers judge), or let judge_for_generations train the "
            "local embedding judge on its verdicts"
        )
    items = [JudgeItem(prompt=p, response=r) for p, r in zip(prompts, responses)]
    if cache is not None:
        return judge_with_cache(judge, items, policy, cache, progress=progress)
    verdicts = judge.judge(items, policy)
    if progress is not None:
        progress(len(items), len(items))
    return verdicts, {"requests": len(items), "unknown": sum(v.compliant is None for v in verdicts)}


def evaluate_generations(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: Judge,
    policy: Policy,
    *,
    groups: Sequence[Any] | None = None,
    reference_model=None,
    cache: VerdictCache | None = None,
    judge_accuracy: float | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    max_prompt_length: int = 512,
    generation_progress: Progress | None = None,
    judge_progress: Progress | None = None,
    generator: Generator | None = None,
) -> EvaluationResult:
    """Generate with the reference and the realigned model on held-out ``prompts``, judge both
    under ``policy`` and report TPA before (reference) and after (realigned), overall and per group.

    ``groups`` labels each prompt (the triage type of its held-out pair; default "all").
    ``judge_accuracy`` (a fraction; by default the judge's own :attr:`Judge.held_out_accuracy`
    when it has one, as a trained local judge does) is reported next to the TPAs together with
    :func:`significant_improvement`. Generation is greedy (deterministic); ``cache`` avoids judging
    an identical (prompt, response) twice, e.g. when the two models answer alike or the stage reruns.
    ``generator`` (a vLLM engine, ``evaluation.generator: vllm``) generates instead of ``model``.
    Raises DataError for no prompts or a ``groups`` of another length, TraceError for a judge that
    cannot read generated text.
    """
    groups = [DEFAULT_GROUP] * len(prompts) if groups is None else [group_name(g) for g in groups]
    if len(groups) != len(prompts):
        raise DataError(f"evaluation: {len(prompts)} prompts but {len(groups)} group labels")
    if not prompts:
        raise DataError("evaluation: no held-out prompts to evaluate")
    if judge_accuracy is None:
        judge_accuracy = judge.held_out_accuracy
    n = len(prompts)
    reference, realigned, ref_seconds, new_seconds = generate_reference_and_realigned(
        model,
        tokenizer,
        prompts,
        reference_model=reference_model,
        progress=generation_progress,
        generator=generator,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_length=max_prompt_length,
    )
    t0 = time.perf_counter()
    verdicts, stats = judge_generations(
        judge, list(prompts) * 2, reference + realigned, policy, cache=cache, progress=judge_progress
    )
    judge_seconds = time.perf_counter() - t0
    before, after = verdicts[:n], verdicts[n:]

    rows = [
        {
            "prompt": p,
            "group": g,
            "reference_response": r,
            "realigned_response": a,
            "reference_compliant": vb.compliant,
            "realigned_compliant": va.compliant,
            "reference_confidence": vb.confidence,
            "realigned_confidence": va.confidence,
            "reference_reason": vb.reason,
            "realigned_reason": va.reason,
        }
        for p, g, r, a, vb, va in zip(prompts, groups, reference, realigned, before, after)
    ]
    tpa_before, tpa_after = target_policy_agreement(before), target_policy_agreement(after)
    groups_before, groups_after = tpa_by_group(before, groups), tpa_by_group(after, groups)
    by_group = {g: {"before": groups_before[g], "after": groups_after[g]} for g in groups_before}

    metrics: dict[str, float | None] = {
        "tpa_before": tpa_before["tpa"],
        "tpa_after": tpa_after["tpa"],
        "tpa_delta": None
        if tpa_before["tpa"] is None or tpa_after["tpa"] is None
        else tpa_after["tpa"] - tpa_before["tpa"],
        "n": n,
        "n_unknown_before": tpa_before["n_unknown"],
        "n_unknown_after": tpa_after["n_unknown"],
        "generation_seconds_reference": ref_seconds,
        "generation_seconds_realigned": new_seconds,
        "judge_seconds": judge_seconds,
        "judge_requests": stats.get("requests", 2 * n),
    }
    for g, both in by_group.items():
        metrics[f"tpa_before/{g}"] = both["before"]["tpa"]
        metrics[f"tpa_after/{g}"] = both["after"]["tpa"]
        metrics[f"n/{g}"] = both["before"]["n"]
    if judge_accuracy is not None:
        metrics["judge_accuracy"] = judge_accuracy
        metrics["judge_error_pp"] = 100.0 * (1.0 - judge_accuracy)
        metrics["significant"] = float(significant_improvement(tpa_before["tpa"], tpa_after["tpa"], judge_accuracy))
    return EvaluationResult(
        rows=rows,
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        by_group=by_group,
        judge=judge.identity,
        judge_stats=dict(stats),
    )
