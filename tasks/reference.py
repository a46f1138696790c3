"""Stage: everything at theta_ref -- initial adapter, gold batch, impact scores and weights,
reference log-probs (one shared batched pass)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from trace_realign.tasks.artifacts import describe, folder_sha256, publish_folder, read_triaged, write_parquet
from trace_realign.tasks.common import Bar, StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.assets import resolve_model
from trace_realign.core.config import ModelConfig, ReferenceTrainingConfig, TriageConfig, WeightsConfig


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
    this stage reads; with ``num_processes`` above 1 the scores come from that many processes).
    ``policy_sha256`` is part of the key on purpose: every artifact downstream of
    a policy edit is recomputed under (and recorded with) the new policy, even where the edit
    happened not to change a verdict. ``input_files_sha256`` holds the content hash of
    ``weights.gold_path`` when set, so editing that file recomputes the stage."""
    # torch and transformers load only when the stage runs, not when it is answered from the cache.
    from trace_realign.core.modeling import load_tokenizer, resolve_device, save_adapter, trainable_model
    from trace_realign.core.reference import (
        ScoreRanks,
        check_gold_labels,
        gold_table,
        load_user_gold,
        run_reference_stage,
        triage_kinds,
        weights_table,
    )

    ctx = context_of(run)
    model_cfg = ModelConfig.model_validate(model)
    weights_cfg = WeightsConfig.model_validate(weights)
    training_cfg = ReferenceTrainingConfig.model_validate(training)
    with stage_run(ctx, "reference") as stage:
        triaged = read_triaged(shards, triage_kinds(training_cfg))
        check_gold_labels(triaged, training_cfg)  # before loading the model
        path = resolve_model(model_cfg.path)
        tokenizer = load_tokenizer(path)
        device = resolve_device(model_cfg.device)
        policy_model = trainable_model(path, training_cfg, dtype=model_cfg.dtype, device=device, seed=seed)
        folder = ctx.folder("artifacts", "reference")
        artifacts = {}
        if not training_cfg.full_finetune:
            # The adapter the scores are taken at is the one training starts from (and the one
            # the processes of a multi-process scoring load).
            build = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=folder))
            save_adapter(policy_model, build)
            final = publish_folder(build, folder / f"initial_adapter-{folder_sha256(build)[:8]}")
            artifacts["initial_adapter"] = describe(final)
        ranks = ScoreRanks(
            str(path), artifacts["initial_adapter"]["path"] if "initial_adapter" in artifacts else None,
            str(ctx.folder("artifacts", "reference", "launch")), dtype=model_cfg.dtype, device=model_cfg.device,
            echo=ctx.progress,
        )  # fmt: skip
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
            user_gold=load_user_gold(weights_cfg.gold_path) if weights_cfg.gold_path else None,
            progress=progress,
            ranks=ranks,
        )
        for bar in bars.values():
            bar.close()
        table = weights_table(out, triaged)
        weights_path = write_parquet(table, folder, "weights")
        gold = gold_table(out.gold)
        gold_path = write_parquet(gold, folder, "gold")
        artifacts.update({"weights": describe(weights_path, table.num_rows), "gold": describe(gold_path, gold.num_rows)})
        scores = [v for v in table.column("impact_score").to_pylist() if v is not None]
        metrics = {**{k: v for k, v in out.stats.items() if isinstance(v, (int, float))}}
        if scores:
            metrics.update({"score_min": min(scores), "score_max": max(scores), "score_mean": sum(scores) / len(scores)})
        stage.client.log_artifact(stage.run_id, str(weights_path), "reference")
        stage.client.log_artifact(stage.run_id, str(gold_path), "reference")
        params = {"weights": weights, "beta": training_cfg.beta, "punish_form": training_cfg.punish_form, "policy_sha256": policy_sha256}
        return stage.result(artifacts, metrics, params)
