"""Stage: the policy diff, from the verdicts under the previous policy and under the new one.

Outputs ``policy-diff-<sha8>.md`` (the report :func:`~trace_realign.core.policy_diff.render_markdown`
writes) and ``policy-diff-<sha8>.json`` (:func:`~trace_realign.core.policy_diff.diff_summary` with
the policies and the cost numbers), both logged to the stage's MLflow run under ``policy_diff/``.
"""

from __future__ import annotations

from prefect import task

from trace_realign.tasks.artifacts import describe, read_parquet, write_json, write_text
from trace_realign.tasks.common import StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.config import TrainingConfig, TriageConfig
from trace_realign.core.data import table_to_pairs
from trace_realign.core.policy import load_policy
from trace_realign.core.policy_diff import diff_summary, diff_triage, realignment_cost, render_markdown


def _label(policy) -> str:
    name = policy.name or (policy.path.name if policy.path else "policy")
    return f"{name}" + (f" v{policy.version}" if policy.version is not None else "") + f" ({policy.sha256[:12]})"


@task(name="diff", cache_key_fn=stage_cache_key, persist_result=True)
def policy_diff_stage(
    pairs: dict,
    previous_verdicts: list[dict],
    verdicts: list[dict],
    previous_policy_path: str,
    previous_policy_sha256: str,
    policy_path: str,
    policy_sha256: str,
    triage: dict,
    training: dict,
    holdout_fraction: float,
    evaluation_prompts: int | None,
    run: dict,
) -> StageResult:
    """Compare the triage of every pair under the previous and the new policy (verdict shards of
    the judge stage run on each); metrics ``diff_moved``, ``diff_<old>_to_<new>`` per movement and
    the cost estimate's numbers (``cost_*``)."""
    ctx = context_of(run)
    triage_cfg = TriageConfig.model_validate(triage)
    training_cfg = TrainingConfig.model_validate(training)
    with stage_run(ctx, "diff") as stage:
        loaded = table_to_pairs(read_parquet(pairs["path"]))
        old_rows = [row for v in previous_verdicts for row in read_parquet(v["path"]).to_pylist()]
        new_rows = [row for v in verdicts for row in read_parquet(v["path"]).to_pylist()]
        old_policy, new_policy = load_policy(previous_policy_path), load_policy(policy_path)
        diff = diff_triage(loaded, old_rows, new_rows, triage_cfg.min_confidence)
        rows, numbers = realignment_cost(
            diff, holdout_fraction=holdout_fraction, method=training_cfg.method, use_kl=training_cfg.use_kl,
            per_device_batch_size=training_cfg.per_device_batch_size,
            gradient_accumulation_steps=training_cfg.gradient_accumulation_steps,
            num_train_epochs=training_cfg.num_train_epochs, max_steps=training_cfg.max_steps,
            num_processes=training_cfg.num_processes, corrections=triage_cfg.corrections, evaluation_prompts=evaluation_prompts,
        )
        judge = new_rows[0]["judge"] if new_rows else "?"
        report = render_markdown(diff, old_policy=_label(old_policy), new_policy=_label(new_policy), judge=judge, cost=rows)
        summary = {
            **diff_summary(diff),
            "previous_policy": {"path": previous_policy_path, "sha256": old_policy.sha256, "name": old_policy.name},
            "policy": {"path": policy_path, "sha256": new_policy.sha256, "name": new_policy.name},
            "judge": judge,
            "cost": numbers,
        }
        folder = ctx.folder("artifacts", "diff")
        md_path = write_text(report, folder, "policy-diff", "md")
        json_path = write_json(summary, folder, "policy-diff")
        for path in (md_path, json_path):
            stage.client.log_artifact(stage.run_id, str(path), "policy_diff")
        metrics = {"diff_moved": len(diff.moved), "diff_pairs": diff.total}
        metrics.update({f"diff_{k.replace(' -> ', '_to_')}": v for k, v in summary["movements"].items()})
        metrics.update({f"cost_{k}": v for k, v in numbers.items()})
        params = {"previous_policy_sha256": previous_policy_sha256, "policy_sha256": policy_sha256}
        return stage.result({"report": describe(md_path), "summary": describe(json_path)}, metrics, params)
