"""Stage: triage every pair from its verdicts and partition into Parquet shards.

Outputs ``invert-*``, ``punish-*``, ``retain-*`` shards of training pairs, ``unknown-*`` (left
out of training, counted), and ``holdout-*``: pairs kept out of training for evaluation, chosen
by a hash of their ``pair_id`` so the split is stable across runs. With ``triage.corrections``
the oracle writes a correction for every PUNISH pair (cached like verdicts). With
``triage.noise`` a seeded share of the verdicts is corrupted before triage (the verdict shards and
cache stay as the judge gave them). Every pair carries its gold verdicts for ``gold_dpo`` where
there is a source: ``triage.gold_labels_path``, else the pairs' annotations under the policy's rules.
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
from trace_realign.core.oracle.verdicts import gold_from_annotations, gold_from_labels, triage_from_verdicts
from trace_realign.core.triage import (
    TriageType, confidence_stats, gold_view, noise_stats, split_holdout, triage_counts, triaged_to_table,
)

def _write_shards(triaged, folder, stem, size):
    out = []
    for start in range(0, len(triaged), size):
        chunk = triaged[start : start + size]
        out.append(describe(write_parquet(triaged_to_table(chunk), folder, f"{stem}-{start // size:04d}"), len(chunk)))
    return out


def low_confidence_metrics(unrouted, threshold: float) -> dict[str, int]:
    """``triage_<k>`` of :func:`~trace_realign.core.triage.confidence_stats` for the pairs triaged
    without the threshold; prints one warning line when no known verdict carries a confidence, so
    the threshold routed nothing."""
    stats = confidence_stats(
        [(t.chosen_compliant, t.rejected_compliant) for t in unrouted],
        [(t.chosen_confidence, t.rejected_confidence) for t in unrouted],
        threshold,
    )
    known = sum((t.chosen_compliant is not None) + (t.rejected_compliant is not None) for t in unrouted)
    if known and stats["no_confidence"] == known:
        print(
            f"warning: triage.min_confidence={threshold:g} routed nothing: none of the {known} known verdicts "
            "carries a confidence (a judge without token log-probs, such as the annotations judge)"
        )
    return {f"triage_{k}": v for k, v in stats.items()}


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
    oracle's model files (the judge that writes corrections) and of ``triage.gold_labels_path``, so
    replacing them recomputes. Logs the noise applied (``noise_*``), what ``triage.min_confidence``
    did (``triage_low_confidence``, ``triage_no_confidence``, ``triage_low_confidence_unknown``:
    :func:`low_confidence_metrics`) and the gold labels' source (param ``gold_source``: file,
    annotations or none) and triage counts (``gold_<type>``)."""
    ctx = context_of(run)
    triage_cfg = TriageConfig.model_validate(triage)
    with stage_run(ctx, "triage") as stage:
        rows = [row for v in verdicts for row in read_parquet(v["path"]).to_pylist()]
        policy = load_policy(policy_path)
        loaded = table_to_pairs(read_parquet(pairs["path"]))
        if triage_cfg.gold_labels_path:
            from trace_realign.core.evaluation.labels import load_generation_labels  # loads torch: only when used

            labels = load_generation_labels(triage_cfg.gold_labels_path, policy, setting="triage.gold_labels_path")
            gold, gold_source = gold_from_labels(loaded, labels), "file"
        else:
            gold = gold_from_annotations(loaded, policy)
            gold_source = "annotations" if gold is not None else "none"
        noise = triage_cfg.noise
        noisy = (noise.rate, noise.mode, noise.seed) if noise is not None else None
        triaged = unrouted = triage_from_verdicts(loaded, rows, gold=gold, noise=noisy)
        metrics = {}
        if noise is not None:
            metrics.update({"noise_rate": noise.rate, **noise_stats(triage_from_verdicts(loaded, rows, gold=gold), unrouted)})
        if (threshold := triage_cfg.min_confidence) is not None:
            triaged = triage_from_verdicts(loaded, rows, gold=gold, noise=noisy, min_confidence=threshold)
            metrics.update(low_confidence_metrics(unrouted, threshold))
        if triage_cfg.corrections:
            with make_judge(oracle, where="oracle") as judge, VerdictCache(ctx.folder() / "verdicts.sqlite") as cache:
                with Bar("corrections", sum(t.type is TriageType.PUNISH for t in triaged), ctx.progress) as bar:
                    triaged, stats = correct_punish_pairs(triaged, judge, policy, cache, bar.absolute)
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
        metrics.update({f"gold_{k}": v for k, v in triage_counts(gold_view(t).type for t in train).items()})
        params = {"triage": triage, "holdout_fraction": holdout_fraction, "gold_source": gold_source}
        return stage.result(artifacts, metrics, params, {"counts": counts, "gold_source": gold_source})
