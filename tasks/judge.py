"""Stage: judge both responses of every pair under the new policy, one task run per shard.

Verdicts go to the persistent verdict cache as they arrive, so a crash loses at most the
requests in flight and a rerun of the shard asks only what is missing, plus the cached unknowns
that have attempts left (``oracle.max_unknown_attempts``). ``refresh_unknown`` asks every cached
unknown again (``--fresh judge``); ``refresh_known`` asks known verdicts again too.
"""

from __future__ import annotations

from prefect import task

from trace_realign.tasks.artifacts import describe, read_parquet, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.data import table_to_pairs
from trace_realign.core.oracle import VerdictCache, judge_items, judge_with_cache, make_judge, parse_judge_config
from trace_realign.core.oracle.verdicts import verdict_table
from trace_realign.core.policy import load_policy

@task(name="judge", cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{label}-{shard_index}")
def judge_shard(
    shard: dict,
    shard_index: int,
    policy_path: str,
    policy_sha256: str,
    oracle: dict,
    input_files_sha256: dict,
    run: dict,
    refresh_unknown: bool = False,
    refresh_known: bool = False,
    label: str = "judge",
) -> StageResult:
    """One shard of pairs -> ``verdicts-<k>-<sha8>.parquet`` (:data:`~trace_realign.core.oracle.verdicts.VERDICT_SCHEMA`).

    ``input_files_sha256`` holds the content hashes of the judge's model files (a transformers or
    vLLM judge folder), so replacing the judge model recomputes the stage. ``label`` names the stage
    run (``<label>-<k>``): ``judge`` under the new policy, ``judge-previous`` under the previous one."""
    ctx = context_of(run)
    oracle_cfg = parse_judge_config(oracle, "oracle")
    with stage_run(ctx, f"{label}-{shard_index:04d}") as stage:
        policy = load_policy(policy_path)
        pairs = table_to_pairs(read_parquet(shard["path"]))
        items = judge_items(pairs)
        with make_judge(oracle_cfg, where="oracle") as judge, VerdictCache(ctx.folder() / "verdicts.sqlite") as cache:
            with Bar(f"judging shard {shard_index}", len(items), ctx.progress) as bar:
                verdicts, stats = judge_with_cache(
                    judge, items, policy, cache, progress=bar.absolute, refresh_unknown=refresh_unknown,
                    refresh_known=refresh_known, max_unknown_attempts=getattr(oracle_cfg, "max_unknown_attempts", None),  # LLM judges only
                )
            identity = judge.identity
        table = verdict_table(pairs, verdicts, identity, policy.sha256)
        path = write_parquet(table, ctx.folder("artifacts", "verdicts"), f"verdicts-{shard_index:04d}")
        params = {"oracle": {k: v for k, v in oracle.items() if "template" not in k}, "judge_identity": identity}
        metrics = {f"judge_{k}": v for k, v in stats.items()}
        return stage.result({"verdicts": describe(path, table.num_rows)}, metrics, params, {"judge": identity})
