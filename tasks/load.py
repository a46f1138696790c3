"""Stage: load and validate the preference pairs, write them as Parquet shards for judging."""

from __future__ import annotations

from prefect import task

from trace_realign.tasks import tracking
from trace_realign.tasks.artifacts import describe, write_parquet
from trace_realign.tasks.common import StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.config import DataConfig
from trace_realign.core.data import load_pairs, pairs_to_table


@task(name="load", cache_key_fn=stage_cache_key, persist_result=True)
def load_data(data: dict, data_sha256: str, run: dict) -> StageResult:
    """Pairs file -> ``pairs-<sha8>.parquet`` and ``shard-<k>-<sha8>.parquet`` (``data.shard_size`` pairs each)."""
    ctx = context_of(run)
    data_cfg = DataConfig.model_validate(data)
    with stage_run(ctx, "load") as stage:
        result = load_pairs(
            data_cfg.path, format=data_cfg.format, split=data_cfg.split, config_name=data_cfg.config_name,
            columns=data_cfg.columns or None, adapter=data_cfg.adapter, on_invalid=data_cfg.on_invalid, limit=data_cfg.limit,
        )  # fmt: skip
        folder = ctx.folder("artifacts", "data")
        table = pairs_to_table(result.pairs)
        pairs_path = write_parquet(table, folder, "pairs")
        size = data_cfg.shard_size
        shards = [
            describe(write_parquet(table.slice(start, size), folder, f"shard-{start // size:04d}"))
            for start in range(0, table.num_rows, size)
        ]
        metrics = {"rows_read": result.rows_read, "pairs": len(result.pairs), "skipped": sum(result.skipped.values())}
        tracking.log_dataset(stage.client, stage.run_id, "preference_pairs", data_cfg.path, data_sha256, len(result.pairs))
        return stage.result(
            {"pairs": describe(pairs_path, table.num_rows), "shards": shards}, metrics, {"data": data},
            {"skipped": dict(result.skipped)},
        )
