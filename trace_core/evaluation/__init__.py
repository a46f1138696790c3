"""Evaluation: generate before and after realignment, judge the generations, measure utility.

The pipeline's evaluation stage calls these functions; they import neither Prefect nor MLflow.

* ``generation`` -- :func:`generate`, deterministic batched generation (left padding, greedy by
  default; a batch gives exactly the text each prompt gives alone), and
  :func:`generate_reference_and_realigned`, the reference and the realigned model's generations from
  one copy of the weights (a LoRA model with its adapter disabled, then enabled).
* ``tpa`` -- :func:`target_policy_agreement`, :func:`tpa_by_group`: TPA, the percentage of
  generations the judge finds compliant with the new policy (arXiv 2511.02623, experiments), overall
  and per triage type; :func:`significant_improvement`, whether a TPA gain exceeds the judge's own
  error rate.
* ``labels`` -- :func:`load_generation_labels`, :func:`judge_on_labels`, :func:`labelled_tpa`:
  generations labelled by hand, a judge's agreement with them, TPA from them.
* ``utility`` -- :func:`response_perplexity`, :func:`utility_proxy`: perplexity of given responses
  (the held-out RETAIN responses) under the reference and the realigned model, and their ratio.
* ``judge`` -- :func:`judge_for_generations`: the configured judge when it reads generated text,
  else a local judge (``trace_realign.core.oracle.local_judges``) trained on the training split's
  verdicts.
* ``run`` -- :func:`evaluate_generations` -> :class:`EvaluationResult`: generation and judging of
  held-out prompts, with TPA before and after.
* ``degeneration`` -- :func:`seq_rep_n`, :func:`distinct_n`: repetition within a generation and
  diversity across generations.
* ``winrate`` -- :func:`win_rate` -> :class:`WinRate`: how often a judge prefers one response list
  over another to the same prompts, both orders asked (wins, losses, ties).
* ``attacks`` -- :func:`load_attack_prompts`, :func:`evaluate_attacks` -> :class:`AttackResult`: attack
  success rate under the paper's adversarial wrappers (:data:`WRAPPERS`) over AdvBench prompts;
  :data:`ATTACKS_SCHEMA`, the attacks table.
* ``report`` -- :func:`evaluation_prompts`, :func:`evaluate_realignment` ->
  :class:`RealignmentReport`: the evaluation stage's whole computation (generations, utility proxy,
  agreement with hand labels) and its report; :data:`GENERATIONS_SCHEMA`, the generations table.
"""

from trace_realign.core.evaluation.attacks import (
    ATTACKS_SCHEMA,
    WRAPPERS,
    AttackResult,
    attack_success_rate,
    evaluate_attacks,
    load_attack_prompts,
)
from trace_realign.core.evaluation.degeneration import distinct_n, seq_rep_n
from trace_realign.core.evaluation.generation import Progress, generate, generate_reference_and_realigned
from trace_realign.core.evaluation.judge import judge_for_generations, local_judge_from_verdicts
from trace_realign.core.evaluation.labels import (
    LabelledResponse,
    judge_on_labels,
    labelled_tpa,
    load_generation_labels,
)
from trace_realign.core.evaluation.report import GENERATIONS_SCHEMA, RealignmentReport, evaluate_realignment, evaluation_prompts
from trace_realign.core.evaluation.run import EvaluationResult, evaluate_generations, judge_generations
from trace_realign.core.evaluation.tpa import significant_improvement, target_policy_agreement, tpa_by_group
from trace_realign.core.evaluation.utility import response_nll, response_perplexity, utility_proxy
from trace_realign.core.evaluation.winrate import WinRate, pair_outcome, win_rate

__all__ = [
    "ATTACKS_SCHEMA",
    "AttackResult",
    "GENERATIONS_SCHEMA",
    "WRAPPERS",
    "WinRate",
    "attack_success_rate",
    "evaluate_attacks",
    "load_attack_prompts",
    "pair_outcome",
    "win_rate",
    "EvaluationResult",
    "RealignmentReport",
    "distinct_n",
    "LabelledResponse",
    "Progress",
    "evaluate_generations",
    "evaluate_realignment",
    "evaluation_prompts",
    "generate",
    "generate_reference_and_realigned",
    "judge_for_generations",
    "judge_generations",
    "judge_on_labels",
    "labelled_tpa",
    "load_generation_labels",
    "local_judge_from_verdicts",
    "response_nll",
    "response_perplexity",
    "seq_rep_n",
    "significant_improvement",
    "target_policy_agreement",
    "tpa_by_group",
    "utility_proxy",
]
