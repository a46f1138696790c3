"""Stage: everything at theta_ref -- initial adapter, gold batch, impact scores and weights,
reference log-probs (one shared batched pass)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
from prefect import task

from trace_realign.tasks.artifacts import describe, folder_sha256, publish_folder, read_triaged, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, device_for, stage_cache_key, stage_run
from trace_realign.core.assets import resolve_model
from trace_realign.core.config import ModelConfig, ReferenceTrainingConfig, TriageConfig, WeightsConfig
from trace_realign.core.data import canonical_json, load_pairs
from trace_realign.core.impact import GoldPair
from trace_realign.core.modeling import load_tokenizer, save_adapter, trainable_model
from trace_realign.core.reference import run_reference_stage, weights_table

GOLD_SCHEMA = pa.schema(
    [("pair_id", pa.string()), ("prompt", pa.string()), ("preferred", pa.string()), ("dispreferred", pa.string()), ("source", pa.string())]
)


def user_gold(path: str) -> list[GoldPair]:
    res = load_pairs(path, columns={"chosen": "preferred", "rejected": "dispreferred"})
    return [GoldPair(p.pair_id, p.prompt, p.chosen, p.rejected, "user") for p in res.pairs]


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
    """Scores, weights and reference log-probs. ``model``, ``weights``, ``training`` and ``triage``
    are the config sections as JSON (``training``: :meth:`TrainingConfig.reference_view`, only what
    this stage reads). ``policy_sha256`` is part of the key on purpose: every artifact downstream of
    a policy edit is recomputed under (and recorded with) the new policy, even where the edit
    happened not to change a verdict. ``input_files_sha256`` holds the content hash of
    ``weights.gold_path`` when set, so editing that file recomputes the stage."""
    ctx = context_of(run)
    model_cfg = ModelConfig.model_validate(model)
    weights_cfg = WeightsConfig.model_validate(weights)
    training_cfg = ReferenceTrainingConfig.model_validate(training)
    path = resolve_model(model_cfg.path)
    tokenizer = load_tokenizer(path)
    policy_model = trainable_model(path, training_cfg, dtype=model_cfg.dtype, device=device_for(model_cfg.device), seed=seed)
    triaged = read_triaged(shards)
    with stage_run(ctx, "reference") as stage:
        bars: dict[str, Bar] = {}

        def progress(part, done, total):
            if part not in bars:
                bars[part] = Bar(f"reference: {part}", total, ctx.progress)
            bars[part].absolute(int(done), total)

        out = run_reference_stage(
            policy_model,
            tokenizer,
            triaged,
            training_cfg,
            weights_cfg,
            TriageConfig.model_validate(triage),
            seed=seed,
            user_gold=user_gold(weights_cfg.gold_path) if weights_cfg.gold_path else None,
            progress=progress,
        )
        for bar in bars.values():
            bar.close()
        table = weights_table(out, triaged)
        folder = ctx.folder("artifacts", "reference")
        weights_path = write_parquet(table, folder, "weights")
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
        artifacts = {"weights": describe(weights_path, table.num_rows), "gold": describe(gold_path, len(gold_rows))}
        if not training_cfg.full_finetune:
            # The adapter the scores were taken at is the one training starts from.
            build = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=folder))
            save_adapter(policy_model, build)
            final = publish_folder(build, folder / f"initial_adapter-{folder_sha256(build)[:8]}")
            artifacts["initial_adapter"] = describe(final)
        scores = [v for v in table.column("impact_score").to_pylist() if v is not None]
        metrics = {**{k: v for k, v in out.stats.items() if isinstance(v, (int, float))}}
        if scores:
            metrics.update({"score_min": min(scores), "score_max": max(scores), "score_mean": sum(scores) / len(scores)})
        stage.client.log_artifact(stage.run_id, str(weights_path), "reference")
        stage.client.log_artifact(stage.run_id, str(gold_path), "reference")
        params = {"weights": weights, "beta": training_cfg.beta, "punish_form": training_cfg.punish_form, "policy_sha256": policy_sha256}
        return stage.result(artifacts, metrics, params)
