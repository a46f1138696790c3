"""Stage: triage every pair from its verdicts and partition into Parquet shards.

Outputs ``invert-*``, ``punish-*``, ``retain-*`` shards of training pairs, ``unknown-*`` (left
out of training, counted), and ``holdout-*``: pairs kept out of training for evaluation, chosen
by a hash of their ``pair_id`` so the split is stable across runs. With ``triage.corrections``
the oracle writes a correction for every PUNISH pair (cached like verdicts).
"""

from __future__ import annotations

from prefect import task

from trace_realign.tasks.artifacts import describe, read_parquet, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.data import table_to_pairs
from trace_realign.core.oracle import VerdictCache, make_judge
from trace_realign.core.oracle.cache import correct_punish_pairs
from trace_realign.core.policy import load_policy
from trace_realign.core.config import TriageConfig
from trace_realign.core.oracle.verdicts import triage_from_verdicts
from trace_realign.core.triage import TriageType, split_holdout, triage_counts, triaged_to_table

def _write_shards(triaged, folder, stem, size):
    out = []
    for start in range(0, len(triaged), size):
        chunk = triaged[start : start + size]
        out.append(describe(write_parquet(triaged_to_table(chunk), folder, f"{stem}-{start // size:04d}"), len(chunk)))
    return out


@task(name="triage", cache_key_fn=stage_cache_key, persist_result=True)
def triage_and_partition(
    pairs: dict,
    verdicts: list[dict],
    triage: dict,
    holdout_fraction: float,
    shard_size: int,
    policy_path: str,
    policy_sha256: str,
    oracle: dict,
    input_files_sha256: dict,
    run: dict,
) -> StageResult:
    """Triage every pair from its verdicts; ``input_files_sha256`` holds the content hashes of the
    oracle's model files (the judge that writes corrections), so replacing them recomputes."""
    ctx = context_of(run)
    triage_cfg = TriageConfig.model_validate(triage)
    with stage_run(ctx, "triage") as stage:
        rows = [row for v in verdicts for row in read_parquet(v["path"]).to_pylist()]
        triaged = triage_from_verdicts(table_to_pairs(read_parquet(pairs["path"])), rows)
        metrics = {}
        if triage_cfg.corrections:
            with make_judge(oracle, where="oracle") as judge, VerdictCache(ctx.folder() / "verdicts.sqlite") as cache:
                with Bar("corrections", sum(t.type is TriageType.PUNISH for t in triaged), ctx.progress) as bar:
                    triaged, stats = correct_punish_pairs(triaged, judge, load_policy(policy_path), cache, bar.absolute)
            metrics.update({f"corrections_{k}": v for k, v in stats.items()})
        train, holdout = split_holdout(triaged, holdout_fraction)
        folder = ctx.folder("artifacts", "triage")
        artifacts = {
            kind.value: _write_shards([t for t in train if t.type is kind], folder, kind.value, shard_size)
            for kind in TriageType
        }
        artifacts["holdout"] = _write_shards(holdout, folder, "holdout", shard_size)
        counts = triage_counts(t.type for t in triaged)
        train_counts = triage_counts(t.type for t in train)
        metrics.update({f"triage_{k}": v for k, v in counts.items()})
        metrics.update({f"train_{k}": v for k, v in train_counts.items()})
        metrics["holdout_pairs"] = len(holdout)
        total = max(1, counts["total"])
        metrics.update({f"triage_{t.value}_fraction": counts[t.value] / total for t in TriageType})
        params = {"triage": triage, "holdout_fraction": holdout_fraction}
        return stage.result(artifacts, metrics, params, {"counts": counts})
