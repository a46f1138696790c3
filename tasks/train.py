"""Stage: weighted TRACE training from the initial adapter; the realigned model is registered in MLflow."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from prefect import task

from trace_realign.tasks import plots, tracking
from trace_realign.tasks.artifacts import describe, read_parquet
from trace_realign.tasks.common import StageResult, context_of, device_for, stage_cache_key
from trace_realign.tasks.reference import encoder_for, read_triaged
from trace_realign.core.assets import resolve_model
from trace_realign.core.errors import TraceError
from trace_realign.core.modeling import load_adapter, load_model, load_tokenizer
from trace_realign.core.objective import build_samples
from trace_realign.core.training import TrainSettings, save_output, train

TRAIN_FIELDS = set(TrainSettings.__dataclass_fields__)


def train_settings(training: dict, seed: int, progress: bool) -> TrainSettings:
    values = {k: v for k, v in training.items() if k in TRAIN_FIELDS}
    return TrainSettings(**values, seed=seed, disable_tqdm=not progress)


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
    ctx = context_of(run)
    path = resolve_model(model["path"])
    tokenizer = load_tokenizer(path)
    device = device_for(model["device"])
    ref_model = None
    if training["full_finetune"]:
        policy_model = load_model(path, model["dtype"], device)
        for p in policy_model.parameters():
            p.requires_grad_(True)
        ref_model = load_model(path, model["dtype"], device)
    else:
        policy_model = load_adapter(load_model(path, model["dtype"], device), reference["initial_adapter"]["path"], trainable=True)
    triaged = read_triaged(shards)
    samples = build_samples(
        triaged,
        encoder_for(tokenizer, training),
        use_triage=triage["use_triage"],
        use_kl=training["use_kl"],
        use_corrections=triage["corrections"],
    )
    table = {r["pair_id"]: r for r in read_parquet(reference["weights"]["path"]).to_pylist()}
    try:
        samples = [
            replace(s, weight=table[s.pair_id]["weight"], ref_logps=(table[s.pair_id]["ref_logp_a"], table[s.pair_id]["ref_logp_b"]))
            for s in samples
        ]
    except KeyError as exc:
        raise TraceError(f"{reference['weights']['path']}: no weight for pair {exc.args[0]}; rerun with --fresh reference") from None
    settings = replace(train_settings(training, seed, ctx.progress), fail_at_step=ctx.fail_training_at_step)
    # The checkpoint folder is named after what determines the run, so a rerun after a crash resumes it.
    key = hashlib.sha256(json.dumps([reference["weights"]["sha256"], training, triage, model_sha256, seed], sort_keys=True).encode()).hexdigest()[:16]
    out_dir = ctx.folder("artifacts", "train", key)
    resume = any(out_dir.glob("checkpoint-*"))
    with tracking.stage_run(ctx.mlflow_uri, ctx.experiment, ctx.workdir, ctx.parent_run_id, "train") as (c, run_id):
        tracking.log_params(c, run_id, {"training": training, "samples": len(samples), "resumed": resume})
        result = train(policy_model, tokenizer, samples, settings, out_dir, ref_model=ref_model, resume_from_checkpoint=True if resume else None)
        final = out_dir / "final"
        paths = save_output(policy_model, tokenizer, final, merge=training.get("merge", False))
        tracking.log_history(c, run_id, result.log_history)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        metrics["global_step"] = result.global_step
        tracking.log_metrics(c, run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            keys = sorted({k for h in result.log_history for k in h if k.endswith(("loss", "margin", "logratio", "kl"))} - {"train_loss"})
            png = plots.curves(result.log_history, keys, "training", Path(tmp) / "training_curves.png")
            c.log_artifact(run_id, str(png), "plots")
        main = "adapter" if "adapter" in paths else "model"
        c.log_artifacts(run_id, paths[main], "model")
        version = None
        if registered_model_name:
            version = tracking.register_model(c, registered_model_name, run_id, "model", {"policy_sha256": policy_sha256})
        artifacts = {name: describe(p) for name, p in paths.items()}
        stage_result = StageResult("train", artifacts, metrics, run_id, {"registered_version": version, "output_dir": str(final)})
        stage_result.info["mlflow_seconds"] = c.seconds
        return stage_result
