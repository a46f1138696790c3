"""Stage: everything at theta_ref -- initial adapter, gold batch, impact scores and weights,
reference log-probs (one shared batched pass)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from prefect import task

from trace_realign.tasks import tracking
from trace_realign.tasks.artifacts import describe, folder_sha256, publish_folder, read_parquet, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, device_for, stage_cache_key
from trace_realign.tasks.partition import table_to_triaged
from trace_realign.core.assets import resolve_model
from trace_realign.core.data import canonical_json, load_pairs
from trace_realign.core.impact import GoldPair
from trace_realign.core.modeling import LoraSettings, add_lora, load_model, load_tokenizer, save_adapter
from trace_realign.core.reference import ReferenceSettings, run_reference_stage
from trace_realign.core.tokenization import Encoder

WEIGHTS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("triage", pa.string()),
        ("kind", pa.string()),
        ("impact_score", pa.float64()),
        ("weight", pa.float64()),
        ("ref_logp_a", pa.float64()),
        ("ref_logp_b", pa.float64()),
    ]
)
GOLD_SCHEMA = pa.schema(
    [("pair_id", pa.string()), ("prompt", pa.string()), ("preferred", pa.string()), ("dispreferred", pa.string()), ("source", pa.string())]
)


def read_triaged(shards: dict, kinds=("invert", "punish", "retain")):
    out = []
    for kind in kinds:
        for shard in shards.get(kind, []):
            out.extend(table_to_triaged(read_parquet(shard["path"])))
    return out


def user_gold(path: str) -> list[GoldPair]:
    res = load_pairs(path, columns={"chosen": "preferred", "rejected": "dispreferred"})
    return [GoldPair(p.pair_id, p.prompt, p.chosen, p.rejected, "user") for p in res.pairs]


def encoder_for(tokenizer, training: dict) -> Encoder:
    return Encoder(tokenizer, max_length=training["max_length"], max_prompt_length=training.get("max_prompt_length"))


@task(name="reference", cache_key_fn=stage_cache_key, persist_result=True)
def reference_stage(
    shards: dict,
    model: dict,
    model_sha256: str,
    weights: dict,
    training: dict,
    triage: dict,
    input_files_sha256: dict,
    policy_sha256: str,
    seed: int,
    run: dict,
) -> StageResult:
    """Scores, weights and reference log-probs. ``policy_sha256`` is part of the key on purpose:
    every artifact downstream of a policy edit is recomputed under (and recorded with) the new
    policy, even where the edit happened not to change a verdict. ``input_files_sha256`` holds the
    content hash of ``weights.gold_path`` when set, so editing that file recomputes the stage."""
    ctx = context_of(run)
    path = resolve_model(model["path"])
    tokenizer = load_tokenizer(path)
    base = load_model(path, model["dtype"], device_for(model["device"]))
    if training["full_finetune"]:
        policy_model = base
        for p in policy_model.parameters():
            p.requires_grad_(True)
    else:
        policy_model = add_lora(base, LoraSettings(**training["lora"]), seed=seed)
    triaged = read_triaged(shards)
    settings = ReferenceSettings(
        beta=training["beta"],
        punish_form=training["punish_form"],
        gold_size=weights["gold_size"],
        seed=seed,
        batch_size=weights["batch_size"],
        use_triage=triage["use_triage"],
        use_kl=training["use_kl"],
        use_impact_weights=weights["enabled"],
        use_corrections=triage["corrections"],
    )
    with tracking.stage_run(ctx.mlflow_uri, ctx.experiment, ctx.workdir, ctx.parent_run_id, "reference") as (c, run_id):
        bars: dict[str, Bar] = {}

        def progress(stage, done, total):
            if stage not in bars:
                bars[stage] = Bar(f"reference: {stage}", total, ctx.progress)
            bars[stage].absolute(int(done), total)

        out = run_reference_stage(
            policy_model,
            tokenizer,
            triaged,
            encoder_for(tokenizer, training),
            settings,
            user_gold=user_gold(weights["gold_path"]) if weights.get("gold_path") else None,
            progress=progress,
        )
        for bar in bars.values():
            bar.close()
        by_id = {t.pair.pair_id: t.type.value for t in triaged}
        rows = [
            {
                "pair_id": s.pair_id,
                "triage": by_id[s.pair_id],
                "kind": s.kind.name.lower(),
                "impact_score": out.scores.get(s.pair_id),
                "weight": s.weight,
                "ref_logp_a": s.ref_logps[0],
                "ref_logp_b": s.ref_logps[1],
            }
            for s in out.samples
        ]
        folder = ctx.folder("artifacts", "reference")
        weights_path = write_parquet(pa.Table.from_pylist(rows, schema=WEIGHTS_SCHEMA), folder, "weights")
        gold_rows = [
            {
                "pair_id": g.pair_id,
                "prompt": g.prompt if isinstance(g.prompt, str) else canonical_json(g.prompt),
                "preferred": g.preferred,
                "dispreferred": g.dispreferred,
                "source": g.source,
            }
            for g in out.gold
        ]
        gold_path = write_parquet(pa.Table.from_pylist(gold_rows, schema=GOLD_SCHEMA), folder, "gold")
        artifacts = {"weights": describe(weights_path, len(rows)), "gold": describe(gold_path, len(gold_rows))}
        if not training["full_finetune"]:
            # The adapter the scores were taken at is the one training starts from.
            build = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=folder))
            save_adapter(policy_model, build)
            final = publish_folder(build, folder / f"initial_adapter-{folder_sha256(build)[:8]}")
            artifacts["initial_adapter"] = describe(final)
        scores = [r["impact_score"] for r in rows if r["impact_score"] is not None]
        metrics = {**{k: v for k, v in out.stats.items() if isinstance(v, (int, float))}}
        if scores:
            metrics.update({"score_min": min(scores), "score_max": max(scores), "score_mean": sum(scores) / len(scores)})
        tracking.log_params(
            c, run_id, {"weights": weights, "beta": training["beta"], "punish_form": training["punish_form"], "policy_sha256": policy_sha256}
        )
        tracking.log_metrics(c, run_id, metrics)
        c.log_artifact(run_id, str(weights_path), "reference")
        c.log_artifact(run_id, str(gold_path), "reference")
        stage_result = StageResult("reference", artifacts, metrics, run_id)
        stage_result.info["mlflow_seconds"] = c.seconds
        return stage_result
