"""Stage: judge both responses of every pair under the new policy, one task run per shard.

Verdicts go to the persistent verdict cache as they arrive, so a crash loses at most the
requests in flight and a rerun of the shard asks only what is missing, plus the cached unknowns
that have attempts left (``oracle.max_unknown_attempts``). ``refresh_unknown`` asks every cached
unknown again (``--fresh judge``); ``refresh_known`` asks known verdicts again too.
"""

from __future__ import annotations

import contextlib

from prefect import task

from trace_realign.tasks.artifacts import describe, read_parquet, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.data import table_to_pairs
from trace_realign.core.oracle import VerdictCache, judge_items, judge_with_fallback, make_judge, parse_judge_config
from trace_realign.core.oracle.verdicts import verdict_table
from trace_realign.core.policy import load_policy

@task(name="judge", cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{label}-{shard_index}")
def judge_shard(
    shard: dict,
    shard_index: int,
    policy_path: str,
    policy_sha256: str,
    oracle: dict,
    min_confidence: float | None,
    input_files_sha256: dict,
    run: dict,
    refresh_unknown: bool = False,
    refresh_known: bool = False,
    label: str = "judge",
) -> StageResult:
    """One shard of pairs -> ``verdicts-<k>-<sha8>.parquet`` (:data:`~trace_realign.core.oracle.verdicts.VERDICT_SCHEMA`).

    ``input_files_sha256`` holds the content hashes of the judge's model files (a transformers or
    vLLM judge folder), so replacing the judge model recomputes the stage. With ``oracle.fallback``,
    every verdict below ``min_confidence`` (``triage.min_confidence``) is asked of the fallback
    judge instead (:func:`~trace_realign.core.oracle.cache.judge_with_fallback`); the table's
    ``chosen_judge`` and ``rejected_judge`` name the judge of each verdict. ``label`` names the stage
    run (``<label>-<k>``): ``judge`` under the new policy, ``judge-previous`` under the previous one."""
    ctx = context_of(run)
    oracle_cfg = parse_judge_config(oracle, "oracle")
    with stage_run(ctx, f"{label}-{shard_index:04d}") as stage:
        policy = load_policy(policy_path)
        pairs = table_to_pairs(read_parquet(shard["path"]))
        items = judge_items(pairs)
        fallback_cfg = oracle_cfg.fallback if min_confidence is not None else None
        with contextlib.ExitStack() as stack:
            judge = stack.enter_context(make_judge(oracle_cfg, where="oracle"))
            fallback = stack.enter_context(make_judge(fallback_cfg, where="oracle.fallback")) if fallback_cfg else None
            cache = stack.enter_context(VerdictCache(ctx.folder() / "verdicts.sqlite"))
            bar = stack.enter_context(Bar(f"judging shard {shard_index}", len(items), ctx.progress))
            second = stack.enter_context(Bar(f"fallback judge, shard {shard_index}", 0, ctx.progress)) if fallback else None
            verdicts, judges, stats = judge_with_fallback(
                judge, items, policy, cache, fallback=fallback, min_confidence=min_confidence, progress=bar.absolute,
                fallback_progress=second.absolute if second else None, refresh_unknown=refresh_unknown, refresh_known=refresh_known,
            )  # fmt: skip
            identity = judge.identity
            params = {"oracle": _without_templates(oracle), "judge_identity": identity, "min_confidence": min_confidence}
            if fallback is not None:
                params["fallback_identity"] = fallback.identity
        table = verdict_table(pairs, verdicts, identity, policy.sha256, judges)
        path = write_parquet(table, ctx.folder("artifacts", "verdicts"), f"verdicts-{shard_index:04d}")
        metrics = {f"judge_{k}": v for k, v in stats.items()}
        return stage.result({"verdicts": describe(path, table.num_rows)}, metrics, params, {"judge": identity})


def _without_templates(judge: dict) -> dict:
    """A judge config for MLflow params: its templates (long text) left out, its fallback's too."""
    out = {k: v for k, v in judge.items() if "template" not in k}
    if isinstance(out.get("fallback"), dict):
        out["fallback"] = _without_templates(out["fallback"])
    return out
