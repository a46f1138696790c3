"""Stage: generate on held-out prompts with the reference and the realigned model, judge both
under the new policy, and report TPA before and after (overall and per triage bin) and a
utility proxy (perplexity of held-out RETAIN responses, realigned over reference); with
``evaluation.lm_eval.tasks`` set, lm-evaluation-harness benchmarks before and after as well.

The judge is ``evaluation.judge`` when set, else the oracle; when that judge cannot read generated
text (the annotations judge), a local embedding judge trained on the training split's responses
labelled by the oracle's verdicts, its held-out accuracy reported next to every TPA
(:func:`trace_realign.core.evaluation.judge_for_generations`); an LLM judge asks
``evaluation.tpa_question``. The same generations give the realigned model's win rate against the
reference; with ``evaluation.attacks.wrappers``, the attack success rate before and after.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pyarrow as pa
from prefect import task

from trace_realign.tasks import plots
from trace_realign.tasks.artifacts import describe, read_parquet, read_triaged, write_json, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.assets import resolve_model
from trace_realign.core.config import EvaluationConfig, ModelConfig
from trace_realign.core.oracle import VerdictCache
from trace_realign.core.errors import DataError
from trace_realign.core.policy import Policy, load_policy
from trace_realign.core.triage import TriageType


def _evaluation_judge(evaluation: dict, oracle: dict, shards: dict, policy: Policy, seed: int):
    """The evaluation's judge (:func:`judge_for_generations`): ``evaluation.judge``, else the oracle,
    else the local judge trained on the training split's verdicts under ``seed``."""
    from trace_realign.core.evaluation import judge_for_generations

    return judge_for_generations(
        evaluation.get("judge") or oracle, policy, lambda: read_triaged(shards),
        seed=seed, where="evaluation.judge" if evaluation.get("judge") else "oracle",
        question=evaluation.get("tpa_question", "violation"),
    )  # fmt: skip


@task(name="evaluate", cache_key_fn=stage_cache_key, persist_result=True)
def evaluate_stage(
    shards: dict,
    trained: dict,
    model: dict,
    model_sha256: str,
    evaluation: dict,
    training: dict,
    input_files_sha256: dict,
    oracle: dict,
    policy_path: str,
    policy_sha256: str,
    seed: int,
    run: dict,
) -> StageResult:
    """Held-out prompts -> ``generations-<sha8>.parquet`` (:data:`GENERATIONS_SCHEMA`) and
    ``metrics-<sha8>.json`` (:class:`~trace_realign.core.evaluation.RealignmentReport`'s report);
    with attack wrappers also ``attacks-<sha8>.parquet`` (:data:`ATTACKS_SCHEMA`).
    ``training`` is the training section (its ``max_length`` bounds the utility proxy's sequences);
    ``input_files_sha256`` holds the hashes of the prompts, labels and judge model files."""
    # torch, transformers and the evaluation's libraries load only when the stage runs, not when cached.
    import torch

    from trace_realign.core.evaluation import (
        ATTACKS_SCHEMA,
        GENERATIONS_SCHEMA,
        evaluate_realignment,
        evaluation_prompts,
        load_attack_prompts,
        load_generation_labels,
    )
    from trace_realign.core.evaluation.benchmarks import plan_benchmarks, run_benchmarks
    from trace_realign.core.evaluation.generation import MAX_PROMPT_LENGTH
    from trace_realign.core.evaluation.vllm_generation import VLLMGenerator
    from trace_realign.core.modeling import load_realigned, load_tokenizer, resolve_device

    ctx = context_of(run)
    evaluation_cfg = EvaluationConfig.model_validate(evaluation)
    model_cfg = ModelConfig.model_validate(model)
    with stage_run(ctx, "evaluate") as stage:
        benchmarks = plan_benchmarks(evaluation_cfg.lm_eval) if evaluation_cfg.lm_eval.tasks else None
        policy = load_policy(policy_path)
        holdout = read_triaged(shards, kinds=("holdout",))
        prompts, groups = evaluation_prompts(holdout, evaluation_cfg.prompts_path, evaluation_cfg.max_prompts)
        labels = load_generation_labels(evaluation_cfg.labels_path, policy) if evaluation_cfg.labels_path else None
        attacks_cfg = evaluation_cfg.attacks
        attack_prompts, attack_source = (
            load_attack_prompts(attacks_cfg.prompts_path, attacks_cfg.max_prompts) if attacks_cfg.wrappers else ([], "")
        )
        path = resolve_model(model_cfg.path)
        tokenizer = load_tokenizer(path)
        realigned, reference_model = load_realigned(
            path, adapter=trained["adapter"]["path"] if "adapter" in trained else None,
            model_dir=trained["model"]["path"] if "model" in trained else None,
            dtype=model_cfg.dtype, device=resolve_device(model_cfg.device),
        )  # fmt: skip
        judge = _evaluation_judge(evaluation, oracle, shards, policy, seed)
        # evaluation.generator: vllm: one engine (the adapter served on the base) for TPA and attacks
        engine = (
            VLLMGenerator(
                path, adapter=trained.get("adapter", {}).get("path"), dtype=model_cfg.dtype,
                max_model_len=MAX_PROMPT_LENGTH + evaluation_cfg.max_new_tokens,
                enforce_eager=not torch.cuda.is_available(), seed=seed,
            )
            if evaluation_cfg.generator == "vllm"
            else contextlib.nullcontext()
        )  # fmt: skip
        with engine as generator, VerdictCache(ctx.folder() / "verdicts.sqlite") as cache, Bar(
            "generating", 2 * len(prompts), ctx.progress
        ) as gen_bar, Bar("judging generations", 2 * len(prompts), ctx.progress) as judge_bar:
            result = evaluate_realignment(
                realigned, tokenizer, prompts, groups, judge, policy,
                retain=[t.pair for t in holdout if t.type is TriageType.RETAIN], labels=labels,
                reference_model=reference_model, cache=cache, max_new_tokens=evaluation_cfg.max_new_tokens,
                batch_size=evaluation_cfg.batch_size, max_length=training["max_length"],
                generation_progress=gen_bar.absolute, judge_progress=judge_bar.absolute,
                attack_prompts=attack_prompts, attack_wrappers=attacks_cfg.wrappers, attack_source=attack_source,
                generator=generator,
            )  # fmt: skip
        folder = ctx.folder("artifacts", "evaluation")
        table_path = write_parquet(pa.Table.from_pylist(result.rows, schema=GENERATIONS_SCHEMA), folder, "generations")
        # Wall-clock seconds differ on every run: they go to MLflow and the manifest, not into an
        # artifact named by its content (the same work must give the same bytes).
        metrics_path = write_json(result.report, folder, "metrics")
        stage.client.log_artifact(stage.run_id, str(table_path), "evaluation")
        stage.client.log_artifact(stage.run_id, str(metrics_path), "evaluation")
        tpa = {k: v for k, v in (("before", result.metrics.get("tpa_before")), ("after", result.metrics.get("tpa_after"))) if v is not None}
        if tpa:
            with tempfile.TemporaryDirectory() as tmp:
                png = plots.bar_chart(tpa, "target policy agreement (%)", "TPA", Path(tmp) / "tpa.png")
                stage.client.log_artifact(stage.run_id, str(png), "plots")
        params = {"evaluation": {k: v for k, v in evaluation.items() if k != "judge"}, "eval_judge": result.judge}
        artifacts = {"generations": describe(table_path, len(result.rows)), "metrics": describe(metrics_path)}
        metrics = result.metrics
        if result.attack_rows:
            attacks_path = write_parquet(pa.Table.from_pylist(result.attack_rows, schema=ATTACKS_SCHEMA), folder, "attacks")
            stage.client.log_artifact(stage.run_id, str(attacks_path), "evaluation")
            artifacts["attacks"] = describe(attacks_path, len(result.attack_rows))
        if benchmarks is not None:
            bench = run_benchmarks(realigned, tokenizer, benchmarks, reference_model=reference_model)
            bench_path = write_json(bench.results, folder, "lm_eval")
            stage.client.log_artifact(stage.run_id, str(bench_path), "evaluation")
            artifacts["lm_eval"] = describe(bench_path)
            metrics = {**metrics, **bench.metrics}
        return stage.result(artifacts, metrics, params, {"judge": result.judge})


@task(name="head-to-head", cache_key_fn=stage_cache_key, persist_result=True)
def head_to_head_stage(
    generations_a: dict,
    generations_b: dict,
    shards: dict,
    evaluation: dict,
    oracle: dict,
    input_files_sha256: dict,
    policy_path: str,
    policy_sha256: str,
    seed: int,
    run: dict,
) -> StageResult:
    """Win rate of one realigned model's generations (``generations_a``, an evaluate stage's
    generations table) against another's (``generations_b``) on the same held-out prompts, by the
    evaluation judge built as the evaluate stage builds it, each differing pair asked in both orders
    (:func:`~trace_realign.core.evaluation.winrate.win_rate`). Metrics: win_rate, loss_rate,
    tie_rate (percentages, a's view), win_n, win_n_unknown. Raises DataError when the two tables do
    not hold the same prompts in the same order."""
    from trace_realign.core.evaluation import evaluation_prompts, win_rate

    ctx = context_of(run)
    evaluation_cfg = EvaluationConfig.model_validate(evaluation)
    with stage_run(ctx, "head-to-head") as stage:
        a = read_parquet(generations_a["path"]).to_pylist()
        b = read_parquet(generations_b["path"]).to_pylist()
        if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
            raise DataError(f"head-to-head: {generations_a['path']} and {generations_b['path']} hold different prompts")
        policy = load_policy(policy_path)
        holdout = read_triaged(shards, kinds=("holdout",))
        prompts, _ = evaluation_prompts(holdout, evaluation_cfg.prompts_path, evaluation_cfg.max_prompts)
        if len(prompts) != len(a):
            raise DataError(f"head-to-head: {len(a)} generations for {len(prompts)} held-out prompts")
        with _evaluation_judge(evaluation, oracle, shards, policy, seed) as judge:
            wins = win_rate(judge, policy, prompts, [r["realigned_response"] for r in a], [r["realigned_response"] for r in b])
        return stage.result({}, wins.metrics(), {"judge": judge.identity})
