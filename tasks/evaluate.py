"""Stage: generate on held-out prompts with the reference and the realigned model, judge both
under the new policy, and report TPA before and after (overall and per triage bin) and a
utility proxy (perplexity of held-out RETAIN responses, realigned over reference).

The judge is ``evaluation.judge`` when set, else the oracle; when that judge cannot read generated
text (the annotations judge), a local embedding judge trained on the training split's responses
labelled by the oracle's verdicts, its held-out accuracy reported next to every TPA
(:func:`trace_realign.core.evaluation.judge_for_generations`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from prefect import task

from trace_realign.tasks import plots
from trace_realign.tasks.artifacts import describe, read_triaged, write_json, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, device_for, stage_cache_key, stage_run
from trace_realign.core.assets import resolve_model
from trace_realign.core.data import load_prompts
from trace_realign.core.errors import DataError
from trace_realign.core.evaluation import (
    evaluate_generations,
    judge_for_generations,
    judge_on_labels,
    labelled_tpa,
    load_generation_labels,
    utility_proxy,
)
from trace_realign.core.modeling import load_adapter, load_model, load_tokenizer
from trace_realign.core.oracle import VerdictCache
from trace_realign.core.policy import load_policy
from trace_realign.core.triage import TriageType

EVAL_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("group", pa.string()),
        ("reference_response", pa.string()),
        ("realigned_response", pa.string()),
        ("reference_compliant", pa.bool_()),
        ("realigned_compliant", pa.bool_()),
        ("reference_confidence", pa.float64()),
        ("realigned_confidence", pa.float64()),
        ("reference_reason", pa.string()),
        ("realigned_reason", pa.string()),
    ]
)


def _prompt_text(prompt):
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


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
    ctx = context_of(run)
    policy = load_policy(policy_path)
    holdout = read_triaged(shards, kinds=("holdout",))
    retain = [t.pair for t in holdout if t.type is TriageType.RETAIN]
    if evaluation.get("prompts_path"):
        prompts, groups = load_prompts(evaluation["prompts_path"])
    else:
        prompts = [t.pair.prompt for t in holdout]
        groups = [t.type.value for t in holdout]
    prompts, groups = prompts[: evaluation["max_prompts"]], groups[: evaluation["max_prompts"]]
    if not prompts:
        raise DataError("evaluation: no held-out prompts (raise evaluation.holdout_fraction or set evaluation.prompts_path)")

    path = resolve_model(model["path"])
    tokenizer = load_tokenizer(path)
    device = device_for(model["device"])
    reference_model = None
    if "adapter" in trained:
        realigned = load_adapter(load_model(path, model["dtype"], device), trained["adapter"]["path"], trainable=False)
    else:
        realigned = load_model(trained["model"]["path"], model["dtype"], device)
        reference_model = load_model(path, model["dtype"], device)

    with stage_run(ctx, "evaluate") as stage:
        judge = judge_for_generations(
            evaluation.get("judge") or oracle, policy, lambda: read_triaged(shards),
            seed=seed, where="evaluation.judge" if evaluation.get("judge") else "oracle",
        )
        judge_report = judge.held_out
        with VerdictCache(ctx.folder() / "verdicts.sqlite") as cache:
            gen_bar = Bar("generating", 2 * len(prompts), ctx.progress)
            judge_bar = Bar("judging generations", 2 * len(prompts), ctx.progress)
            result = evaluate_generations(
                realigned, tokenizer, prompts, judge, policy,
                groups=groups, reference_model=reference_model, cache=cache,
                max_new_tokens=evaluation["max_new_tokens"], batch_size=evaluation["batch_size"],
                generation_progress=gen_bar.absolute, judge_progress=judge_bar.absolute,
            )
            gen_bar.close()
            judge_bar.close()
            labels = load_generation_labels(evaluation["labels_path"], policy) if evaluation.get("labels_path") else None
            label_agreement = judge_on_labels(judge, policy, labels, cache) if labels else None
        metrics = dict(result.metrics)
        if retain:
            utility = utility_proxy(
                realigned, tokenizer, [p.prompt for p in retain], [p.chosen for p in retain],
                reference_model=reference_model, max_length=training["max_length"],
            )
            metrics["utility_ratio"] = utility["perplexity_ratio"]
            metrics["perplexity_reference"] = utility["reference_perplexity"]
            metrics["perplexity_realigned"] = utility["realigned_perplexity"]
        if judge_report is not None:
            metrics["judge_accuracy"] = judge_report["accuracy"]
            if judge_report.get("cohen_kappa") is not None:
                metrics["judge_kappa"] = judge_report["cohen_kappa"]
        labelled = None
        if labels:
            labelled = {"judge": label_agreement}
            metrics["judge_labelled_accuracy"] = labelled["judge"]["accuracy"]
            metrics["judge_labelled_n"] = labelled["judge"]["n_known"]
            for side, key in (("before", "reference_response"), ("after", "realigned_response")):
                found = labelled_tpa([r["prompt"] for r in result.rows], [r[key] for r in result.rows], labels)
                labelled[side] = found
                metrics[f"labelled_coverage_{side}"] = found["coverage"]
                if found["tpa"] is not None:
                    metrics[f"labelled_tpa_{side}"] = found["tpa"]
        rows = [{**r, "prompt": _prompt_text(r["prompt"])} for r in result.rows]
        folder = ctx.folder("artifacts", "evaluation")
        table_path = write_parquet(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), folder, "generations")
        # Wall-clock seconds differ on every run: they go to MLflow and the manifest, not into an
        # artifact named by its content (the same work must give the same bytes).
        measured = {k: v for k, v in metrics.items() if "seconds" not in k}
        report = {"metrics": measured, "by_group": result.by_group, "judge": result.judge, "judge_report": judge_report, "labelled": labelled}
        metrics_path = write_json(report, folder, "metrics")
        stage.client.log_artifact(stage.run_id, str(table_path), "evaluation")
        stage.client.log_artifact(stage.run_id, str(metrics_path), "evaluation")
        with tempfile.TemporaryDirectory() as tmp:
            tpa = {k: v for k, v in (("before", metrics.get("tpa_before")), ("after", metrics.get("tpa_after"))) if v is not None}
            if tpa:
                png = plots.bar_chart(tpa, "target policy agreement (%)", "TPA", Path(tmp) / "tpa.png")
                stage.client.log_artifact(stage.run_id, str(png), "plots")
        params = {"evaluation": {k: v for k, v in evaluation.items() if k != "judge"}, "eval_judge": result.judge}
        return stage.result(
            {"generations": describe(table_path, len(rows)), "metrics": describe(metrics_path)}, metrics, params, {"judge": result.judge}
        )
