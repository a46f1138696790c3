"""Stage: weighted TRACE training from the initial adapter; the realigned model is registered in MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from trace_realign.tasks import plots, tracking
from trace_realign.tasks.artifacts import describe, read_parquet, read_triaged
from trace_realign.tasks.common import StageResult, context_of, stage_cache_key, stage_run
from trace_realign.core.assets import resolve_model
from trace_realign.core.config import ModelConfig, TrainingConfig, TriageConfig
from trace_realign.core.data import text_sha256


@task(name="train", cache_key_fn=stage_cache_key, persist_result=True)
def train_stage(
    shards: dict,
    reference: dict,
    model: dict,
    model_sha256: str,
    training: dict,
    triage: dict,
    policy_sha256: str,
    seed: int,
    registered_model_name: str | None,
    run: dict,
) -> StageResult:
    """Weighted TRACE training from the reference stage's initial adapter and weights table.
    ``model``, ``training`` and ``triage`` are the config sections as JSON; the run context's
    ``fail_training_at_step`` is the crash test switch (kept out of the cache key). With
    ``training.num_processes`` above 1 the training runs as a subprocess under a launcher
    (:func:`~trace_realign.core.training.run_training`); what it gives back is logged the same way."""
    # torch, transformers and MLflow's model flavors load only when the stage runs, not when it is cached.
    from trace_realign.core.modeling import load_tokenizer
    from trace_realign.core.reference import triage_kinds, training_samples
    from trace_realign.core.training import TrainJob, run_training
    from trace_realign.tasks import mlflow_model

    ctx = context_of(run)
    model_cfg = ModelConfig.model_validate(model)
    training_cfg = TrainingConfig.model_validate(training)
    # The checkpoint folder is named after what determines the run, so a rerun after a crash resumes it.
    key = text_sha256([reference["weights"]["sha256"], training, triage, model_sha256, seed])[:16]
    out_dir = ctx.folder("artifacts", "train", key)
    resume = any(out_dir.glob("checkpoint-*"))
    with stage_run(ctx, "train") as stage:
        path = resolve_model(model_cfg.path)
        weights_path = reference["weights"]["path"]
        samples = training_samples(
            read_triaged(shards, triage_kinds(training_cfg)), load_tokenizer(path), training_cfg, TriageConfig.model_validate(triage),
            read_parquet(weights_path), where=weights_path,
        )  # fmt: skip
        stage.log_params({"training": training, "samples": len(samples), "resumed": resume})
        job = TrainJob(
            str(path), training, str(out_dir), dtype=model_cfg.dtype, device=model_cfg.device,
            adapter=None if training_cfg.full_finetune else reference["initial_adapter"]["path"], seed=seed,
            progress=ctx.progress, fail_at_step=ctx.fail_training_at_step, resume=resume,
        )  # fmt: skip
        output = run_training(job, samples)
        result, paths, final = output.result, output.paths, job.final_dir
        tracking.log_history(stage.client, stage.run_id, result.log_history)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        metrics["global_step"] = result.global_step
        metrics["samples"] = len(samples)
        with tempfile.TemporaryDirectory() as tmp:
            keys = sorted({k for h in result.log_history for k in h if k.endswith(("loss", "margin", "logratio", "kl"))} - {"train_loss"})
            png = plots.curves(result.log_history, keys, "training", Path(tmp) / "training_curves.png")
            stage.client.log_artifact(stage.run_id, str(png), "plots")
        model_id = mlflow_model.log_realigned_model(
            stage.client, stage.run_id, paths, model_cfg.path, model_cfg.dtype, {"base_model_sha256": model_sha256, "policy_sha256": policy_sha256}
        )
        version = None
        if registered_model_name:
            version = tracking.register_model(stage.client, registered_model_name, model_id, stage.run_id, {"policy_sha256": policy_sha256})
        artifacts = {name: describe(p) for name, p in paths.items()}
        return stage.result(artifacts, metrics, info={"registered_version": version, "model_id": model_id, "output_dir": str(final)})
