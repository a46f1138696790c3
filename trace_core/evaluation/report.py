"""The evaluation stage's whole computation: held-out prompts, generations judged before and after,
the utility proxy, agreement with hand labels, and the report they make.

TPA (target policy agreement, arXiv 2511.02623's main metric) is the share of generations the judge
finds compliant with the new policy; it is reported for the reference model (before) and the
realigned one (after), next to the judge's own accuracy where it has one. The same generations give
the win rate of the realigned model against the reference (``winrate``), and, when attack prompts
are given, the attack success rate under adversarial wrappers (``attacks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from trace_realign.core.data import PreferencePair, Prompt, canonical_json, load_prompts
from trace_realign.core.errors import DataError
from trace_realign.core.evaluation.attacks import evaluate_attacks
from trace_realign.core.evaluation.degeneration import distinct_n, seq_rep_n
from trace_realign.core.evaluation.generation import Generator, Progress
from trace_realign.core.evaluation.labels import LabelledResponse, judge_on_labels, labelled_tpa
from trace_realign.core.evaluation.run import evaluate_generations
from trace_realign.core.evaluation.utility import utility_proxy
from trace_realign.core.evaluation.winrate import win_rate
from trace_realign.core.oracle.base import Judge
from trace_realign.core.oracle.cache import VerdictCache
from trace_realign.core.policy import Policy
from trace_realign.core.triage import TriagedPair

GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),  # text, or a chat as canonical JSON
        ("group", pa.string()),
        ("reference_response", pa.string()),
        ("realigned_response", pa.string()),
        ("reference_compliant", pa.bool_()),
        ("realigned_compliant", pa.bool_()),
        ("reference_confidence", pa.float64()),
        ("realigned_confidence", pa.float64()),
        ("reference_reason", pa.string()),
        ("realigned_reason", pa.string()),
        ("realigned_vs_reference", pa.string()),  # win, loss, tie (both orders asked), null: unknown
    ]
)
"""One row per held-out prompt of the evaluation's generations table."""


@dataclass
class RealignmentReport:
    """What one evaluation found.

    metrics: flat numbers for a tracker (:class:`~trace_realign.core.evaluation.run.EvaluationResult`'s,
        plus utility_ratio, perplexity_reference, perplexity_realigned, judge_accuracy, judge_kappa,
        judge_labelled_accuracy, judge_labelled_n, labelled_coverage_{before,after},
        labelled_tpa_{before,after}, the degeneration measures seq_rep_4_{before,after} and
        distinct_2_{before,after} where they apply, win_rate, loss_rate, tie_rate, win_n,
        win_n_unknown (:class:`~trace_realign.core.evaluation.winrate.WinRate`), and with attack
        prompts the ASRs of :class:`~trace_realign.core.evaluation.attacks.AttackResult`), wall-clock
        seconds included.
    rows: the generations table's rows (:data:`GENERATIONS_SCHEMA`).
    report: the JSON report: metrics without wall-clock seconds (the same work gives the same
        bytes), by_group, judge, judge_report (the judge's held-out report), labelled,
        attacks ({wrappers, n_prompts, source} or None).
    judge: the judge's identity.
    attack_rows: the attacks table's rows (:data:`~trace_realign.core.evaluation.attacks.ATTACKS_SCHEMA`);
        empty without attack prompts.
    """

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    report: dict[str, Any]
    judge: str
    attack_rows: list[dict[str, Any]]


def evaluation_prompts(
    holdout: Sequence[TriagedPair], prompts_path: str | Path | None, max_prompts: int
) -> tuple[list[Prompt], list[str]]:
    """(prompts, groups): the first ``max_prompts`` of ``prompts_path`` when set (:func:`load_prompts`),
    else of the held-out pairs' prompts grouped by triage type. Raises DataError when there is none."""
    if prompts_path:
        prompts, groups = load_prompts(prompts_path)
    else:
        prompts = [t.pair.prompt for t in holdout]
        groups = [t.type.value for t in holdout]
    if not prompts:
        raise DataError("evaluation: no held-out prompts (raise evaluation.holdout_fraction or set evaluation.prompts_path)")
    return prompts[:max_prompts], groups[:max_prompts]


def evaluate_realignment(
    realigned,
    tokenizer,
    prompts: Sequence[Prompt],
    groups: Sequence[str],
    judge: Judge,
    policy: Policy,
    *,
    retain: Sequence[PreferencePair] = (),
    labels: Sequence[LabelledResponse] | None = None,
    reference_model=None,
    cache: VerdictCache | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    max_length: int = 256,
    generation_progress: Progress | None = None,
    judge_progress: Progress | None = None,
    attack_prompts: Sequence[str] = (),
    attack_wrappers: Sequence[str] = (),
    attack_source: str = "",
    generator: Generator | None = None,
) -> RealignmentReport:
    """Evaluate a realigned model against its reference.

    Generates on ``prompts`` and judges both models' answers (:func:`evaluate_generations`); with
    held-out RETAIN pairs in ``retain``, the utility proxy (perplexity of their chosen responses,
    realigned over reference, :func:`utility_proxy`, sequences of at most ``max_length`` tokens);
    with hand ``labels``, the judge's agreement with them and TPA from the labels wherever a
    generation has one (:func:`labelled_tpa`). The win rate of the realigned model against the
    reference on the same generations (:func:`win_rate`, both orders asked; no extra generation).
    With ``attack_prompts`` and ``attack_wrappers``, ASR before and after
    (:func:`evaluate_attacks`; ``attack_source`` names the prompts' origin). ``generator`` (a vLLM
    engine, ``evaluation.generator: vllm``) generates both models' answers instead of ``realigned``. Raises DataError as the
    functions it calls do, TraceError for a judge that cannot compare two responses.
    """
    result = evaluate_generations(
        realigned, tokenizer, prompts, judge, policy,
        groups=groups, reference_model=reference_model, cache=cache, generator=generator,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
        generation_progress=generation_progress, judge_progress=judge_progress,
    )  # fmt: skip
    metrics = dict(result.metrics)
    if retain:
        utility = utility_proxy(
            realigned, tokenizer, [p.prompt for p in retain], [p.chosen for p in retain],
            reference_model=reference_model, max_length=max_length,
        )  # fmt: skip
        metrics["utility_ratio"] = utility["perplexity_ratio"]
        metrics["perplexity_reference"] = utility["reference_perplexity"]
        metrics["perplexity_realigned"] = utility["realigned_perplexity"]
    judge_report = judge.held_out
    if judge_report is not None:
        metrics["judge_accuracy"] = judge_report["accuracy"]
        if judge_report.get("cohen_kappa") is not None:
            metrics["judge_kappa"] = judge_report["cohen_kappa"]
    labelled = None
    if labels:
        agreement = judge_on_labels(judge, policy, labels, cache)
        labelled = {"judge": agreement}
        metrics["judge_labelled_accuracy"] = agreement["accuracy"]
        metrics["judge_labelled_n"] = agreement["n_known"]
        for side, key in (("before", "reference_response"), ("after", "realigned_response")):
            found = labelled_tpa([r["prompt"] for r in result.rows], [r[key] for r in result.rows], labels)
            labelled[side] = found
            metrics[f"labelled_coverage_{side}"] = found["coverage"]
            if found["tpa"] is not None:
                metrics[f"labelled_tpa_{side}"] = found["tpa"]
    for side, key in (("before", "reference_response"), ("after", "realigned_response")):
        texts = [r[key] for r in result.rows]
        for name, value in (("seq_rep_4", seq_rep_n(texts, 4)), ("distinct_2", distinct_n(texts, 2))):
            if value is not None:
                metrics[f"{name}_{side}"] = value
    wins = win_rate(
        judge, policy, [r["prompt"] for r in result.rows],
        [r["realigned_response"] for r in result.rows], [r["reference_response"] for r in result.rows],
    )  # fmt: skip
    metrics.update(wins.metrics())
    attacks, attack_rows = None, []
    if attack_prompts and attack_wrappers:
        found = evaluate_attacks(
            realigned, tokenizer, judge, policy, attack_prompts, attack_wrappers, source=attack_source,
            reference_model=reference_model, cache=cache, max_new_tokens=max_new_tokens, batch_size=batch_size,
            generator=generator,
        )  # fmt: skip
        metrics.update(found.metrics)
        attack_rows = found.rows
        attacks = {"wrappers": list(attack_wrappers), "n_prompts": len(attack_prompts), "source": found.source}
    rows = [
        {**r, "prompt": r["prompt"] if isinstance(r["prompt"], str) else canonical_json(r["prompt"]), "realigned_vs_reference": w["outcome"]}
        for r, w in zip(result.rows, wins.rows)
    ]
    measured = {k: v for k, v in metrics.items() if "seconds" not in k}
    report = {
        "metrics": measured, "by_group": result.by_group, "judge": result.judge,
        "judge_report": judge_report, "labelled": labelled, "attacks": attacks,
    }  # fmt: skip
    return RealignmentReport(metrics, rows, report, result.judge, attack_rows)
