"""The realign flow: load -> judge (per shard) -> triage -> reference -> train -> evaluate.

Every stage is a cached Prefect task (see tasks/common.py for the cache key); the flow records a
run manifest and one MLflow parent run whose children are the stage runs. A stage answered from
the cache did not run, so its MLflow run is the one that made its artifacts: the parent run is
tagged with that run's id.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import subprocess
import tempfile
import time
from pathlib import Path

from prefect import flow

from trace_realign.flows.approval import GateClosed, Rejected, artifact_key, await_approval
from trace_realign.flows.meter import MemoryMeter
from trace_realign.flows.shutdown import exit_quietly_on_sigterm_at_shutdown
from trace_realign.flows.stages import STAGES
from trace_realign.flows.workdir import workdir_lock
from trace_realign.tasks import plots, tracking
from trace_realign.tasks.artifacts import HashMemo, read_parquet, write_json_at
from trace_realign.tasks.common import RunContext, StageResult
from trace_realign.tasks.diff import policy_diff_stage
from trace_realign.tasks.evaluate import evaluate_stage
from trace_realign.tasks.judge import judge_shard
from trace_realign.tasks.load import load_data
from trace_realign.tasks.partition import triage_and_partition
from trace_realign.tasks.reference import reference_stage
from trace_realign.tasks.train import train_stage
from trace_realign.core.assets import KNOWN_MODELS, is_prepared, read_marker, resolve_model
from trace_realign.core.config import DataConfig, input_files
from trace_realign.flows.config import PipelineConfig
from trace_realign.core.data import text_sha256
from trace_realign.core.errors import TraceError
from trace_realign.core.oracle import check_unknown_share, verdict_triples
from trace_realign.core.policy import load_policy
from trace_realign.core.policy_diff import render_triage_report
from trace_realign.core.triage import TriageType

PACKAGES = ("trace-realign", "torch", "transformers", "peft", "accelerate", "datasets", "pyarrow", "prefect", "mlflow", "openai")


def data_fingerprint(data: DataConfig, memo: HashMemo) -> str:
    """The content hash of the data file or folder; a Hugging Face hub name is identified by name,
    split and config."""
    path = Path(data.path)
    if path.exists():
        return memo.content(path)
    return text_sha256(["hf", data.path, data.split, data.config_name])


def model_fingerprint(spec: str, memo: HashMemo) -> str:
    """A prepared known model by what it was made from; any other model folder by its contents."""
    folder = Path(resolve_model(spec))
    marker = read_marker(folder)
    if marker and marker.get("fingerprint"):
        # A prepared model is identified by what it was made from (hashing 500 MB each run is waste).
        return text_sha256([marker["fingerprint"], marker.get("transformers_version")])
    return memo.content(folder)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def input_fingerprints(cfg: PipelineConfig, memo: HashMemo) -> dict[str, str]:
    """``{setting: sha256}`` for every file or folder a setting names (gold pairs, held-out prompts,
    labels, judge model folders, ...): stages are keyed on these contents, never on a path whose
    file could change behind it."""
    return {setting: memo.content(path) for setting, path in sorted(input_files(cfg).items())}


def _inputs_for(fingerprints: dict[str, str], *sections: str) -> dict[str, str]:
    """The fingerprints of the files named under ``sections`` (what one stage reads)."""
    return {k: v for k, v in fingerprints.items() if k.split(".", 1)[0] in sections}


def _missing(result: StageResult) -> bool:
    return any(not Path(p).exists() for p in result.artifact_paths())


def _unknowns_to_retry(result: StageResult) -> bool:
    """A judge stage whose verdicts include unknowns that the judge may answer when asked again."""
    return bool(result.metrics.get("judge_unknown_retryable"))


def run_stage(task, stage: str, fresh: set[str], record: dict, recompute_if=_missing, **kwargs) -> StageResult:
    """Run a stage task (from the cache when it may), recomputing it if a cached artifact is gone
    (or ``recompute_if(result)`` says so).

    Results are stored in the run's working folder, whatever Prefect's global settings say, so
    two working folders never read each other's cache.
    """
    storage = Path(kwargs["run"]["workdir"], "prefect", "results")
    t0 = time.perf_counter()
    with MemoryMeter() as memory:
        state = task.with_options(refresh_cache=stage in fresh, result_storage=storage)(**kwargs, return_state=True)
        result = state.result()
        if state.name == "Cached" and (_missing(result) or recompute_if(result)):
            state = task.with_options(refresh_cache=True, result_storage=storage)(**kwargs, return_state=True)
            result = state.result()
    record[result.stage] = {
        "cached": state.name == "Cached",
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": round(memory.peak_mib, 1),
        "task_run_id": str(state.state_details.task_run_id),
        "mlflow_run_id": result.mlflow_run_id,
        "artifacts": result.artifacts,
        "metrics": result.metrics,
        **({"info": result.info} if result.info else {}),
    }
    return result


@flow(name="realign", log_prints=True)
def realign(
    config: dict, until: str = "evaluate", fresh: list[str] | None = None, progress: bool = True,
    workdir_wait_s: float | None = 0.0, rejudge: bool = False, parent_run_id: str | None = None,
    previous_policy: str | None = None,
):
    """Realign the model of ``config`` to its new policy; returns the run manifest.

    ``fresh`` recomputes those stages and every later one (``judge`` also asks every cached unknown
    verdict again); ``rejudge`` asks the judge again for every verdict, known ones included (paid
    for again), and implies ``fresh=["judge"]``. Without either, a judge stage answered from the
    cache is recomputed when it holds unknown verdicts the judge may still answer.

    The run holds its working folder's lock throughout (:mod:`trace_realign.flows.workdir`): with
    ``workdir_wait_s=0`` a folder another run is using fails at once with one line; ``None`` waits
    for it (served runs queue this way). ``parent_run_id`` nests the run's MLflow run under another
    (a comparison's, :mod:`trace_realign.flows.compare`).

    ``previous_policy`` (else ``policy.previous``) names the policy the pairs were aligned under: the
    pairs are judged under it too and the policy diff is reported after triage
    (:mod:`trace_realign.tasks.diff`). With ``approval.required`` the run then pauses for a person
    (:mod:`trace_realign.flows.approval`); a rejection returns a Cancelled state named ``Rejected``
    (nothing trained) instead of the manifest; no decision in time raises
    :class:`~trace_realign.flows.approval.Expired`, so the run fails, as Prefect fails an expired
    pause (whichever of the two the server sees first); the manifest records either under ``approval``.
    """
    cfg = PipelineConfig.model_validate(config)
    if previous_policy:
        cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"previous": previous_policy})})
    if until not in STAGES:
        raise TraceError(f"--until: unknown stage '{until}' (stages: {', '.join(STAGES)})")
    fresh_set: set[str] = set()
    for stage in [*(fresh or []), *(["judge"] if rejudge else [])]:
        if stage not in STAGES:
            raise TraceError(f"--fresh: unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        fresh_set.update(STAGES[STAGES.index(stage) :])
    workdir = Path(cfg.run.workdir).resolve()
    with workdir_lock(workdir, f"trace-realign run {cfg.run.name!r}", wait_s=workdir_wait_s, on_wait=print):
        try:
            return _realign(cfg, workdir, until, fresh_set, progress, rejudge, parent_run_id)
        except Rejected as closed:
            from prefect.states import Cancelled

            return Cancelled(name=closed.state_name, message=str(closed))
        finally:
            exit_quietly_on_sigterm_at_shutdown()


def _realign(
    cfg: PipelineConfig, workdir: Path, until: str, fresh_set: set[str], progress: bool, rejudge: bool, parent_run_id: str | None
) -> dict:
    uri = tracking.tracking_uri(workdir, cfg.mlflow.tracking_uri)
    policy = load_policy(cfg.policy.path)
    previous = load_policy(cfg.policy.previous) if cfg.policy.previous else None
    data = cfg.section("data")
    # Content hashes, remembered per file stamp so unchanged large files are not read again.
    memo = HashMemo(workdir / "cache" / "file_hashes.json")
    data_sha = data_fingerprint(cfg.data, memo)
    prepared = cfg.model.path not in KNOWN_MODELS or is_prepared(cfg.model.path)
    t0 = time.perf_counter()
    with MemoryMeter() as memory:
        model_sha = model_fingerprint(cfg.model.path, memo)  # prepares a known model the first time
    preparation = None if prepared else {"seconds": time.perf_counter() - t0, "peak_rss_mib": round(memory.peak_mib, 1)}
    files = input_fingerprints(cfg, memo)
    memo.save()
    registered, registered_from = tracking.registered_model_name(cfg.run.name, cfg.mlflow.registered_model_name)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, cfg.mlflow.experiment, workdir)
    # Runs of this folder still RUNNING belong to a process that died (this one holds the lock).
    closed = tracking.close_dead_runs(c, exp, workdir)
    tags = {
        "mlflow.runName": cfg.run.name,
        "policy_sha256": policy.sha256,
        "policy_name": policy.name or "",
        "policy_version": str(policy.version or ""),
        "data_sha256": data_sha,
        "model": cfg.model.path,
        "git_commit": git_commit() or "",
        **tracking.process_tags(workdir),
    }
    if registered_from:
        tags["trace.registered_model_name_requested"] = registered_from
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    parent = c.create_run(exp, tags={k: tracking.tag_value(v) for k, v in tags.items()})
    pid = parent.info.run_id
    # The crash switch is a property of this run, not of what training computes: keep it out of cache keys.
    training = cfg.training.model_dump(mode="json", exclude={"fail_at_step"})
    ctx = RunContext(str(workdir), uri, cfg.mlflow.experiment, pid, progress, cfg.training.fail_at_step)
    run = ctx.as_dict()
    tracking.log_params(c, pid, {k: cfg.section(k) for k in ("model", "data", "triage", "weights", "training", "evaluation")})
    stages: dict[str, dict] = {}
    manifest = {
        "run_id": pid,
        "flow_run_id": _flow_run_id(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": cfg.model_dump(mode="json"),
        "policy": {"path": str(Path(cfg.policy.path).resolve()), "sha256": policy.sha256, "name": policy.name, "version": policy.version},
        "previous_policy": (
            {"path": str(Path(cfg.policy.previous).resolve()), "sha256": previous.sha256, "name": previous.name, "version": previous.version}
            if previous else None
        ),
        "data": {"path": data["path"], "sha256": data_sha},
        "model": {"spec": cfg.model.path, "sha256": model_sha},
        "input_files": {k: {"path": str(Path(p).resolve()), "sha256": files[k]} for k, p in input_files(cfg).items()},
        "registered_model_name": registered if cfg.mlflow.register_model else None,
        "closed_dead_runs": closed,
        "git_commit": tags["git_commit"] or None,
        "packages": package_versions(),
        "stages": stages,
        "until": until,
    }
    if preparation:
        manifest["model_preparation"] = preparation
    status = "FAILED"

    def reaches(stage: str) -> bool:
        """Whether the run goes as far as ``stage`` (stages run in :data:`STAGES` order)."""
        return STAGES.index(stage) <= STAGES.index(until)

    def judge_all(label: str, policy_path: str, policy_sha256: str) -> list[dict]:
        """The verdict shards of every pair under one policy (one cached judge stage per shard)."""
        return [
            run_stage(
                judge_shard, "judge", fresh_set, stages, recompute_if=_unknowns_to_retry,
                shard=shard, shard_index=i, policy_path=str(Path(policy_path).resolve()),
                policy_sha256=policy_sha256, oracle=oracle, input_files_sha256=_inputs_for(files, "oracle"),
                min_confidence=cfg.triage.min_confidence,
                run=run, refresh_unknown="judge" in fresh_set, refresh_known=rejudge, label=label,
            ).artifacts["verdicts"]
            for i, shard in enumerate(loaded.artifacts["shards"])
        ]

    try:
        loaded = run_stage(load_data, "load", fresh_set, stages, data=data, data_sha256=data_sha, run=run)
        # The data set is the parent run's input too (the load stage's run is an older one when cached).
        tracking.log_dataset(c, pid, "preference_pairs", cfg.data.path, data_sha, loaded.metrics.get("pairs"))
        if reaches("judge"):
            oracle = cfg.section("oracle")
            verdicts = judge_all("judge", cfg.policy.path, policy.sha256)
            # Too many unknown verdicts means a broken judge: stop before training on what is left.
            rows = [row for v in verdicts for row in read_parquet(v["path"]).to_pylist()]
            manifest["unknown_verdicts"] = check_unknown_share(
                verdict_triples(rows), judge=rows[0]["judge"] if rows else "?",
                max_share=cfg.oracle.max_unknown_share, setting="oracle",
            )
            if previous is not None:
                previous_verdicts = judge_all("judge-previous", cfg.policy.previous, previous.sha256)
            manifest["judge_requests"] = sum(
                info["metrics"].get("judge_requests", 0)
                for stage, info in stages.items()
                if stage.startswith("judge-") and not info["cached"]
            )
        if reaches("triage"):
            triaged = run_stage(
                triage_and_partition, "triage", fresh_set, stages,
                pairs=loaded.artifacts["pairs"], verdicts=verdicts, triage=cfg.section("triage"),
                holdout_fraction=cfg.evaluation.holdout_fraction if cfg.evaluation.enabled else 0.0,
                shard_size=cfg.data.shard_size, policy_path=str(Path(cfg.policy.path).resolve()),
                policy_sha256=policy.sha256, oracle=oracle, input_files_sha256=_inputs_for(files, "oracle", "triage"), run=run,
            )
            _log_triage_plot(c, pid, triaged, workdir)
            report = None
            if previous is not None:
                diffed = run_stage(
                    policy_diff_stage, "triage", fresh_set, stages,
                    pairs=loaded.artifacts["pairs"], previous_verdicts=previous_verdicts, verdicts=verdicts,
                    previous_policy_path=str(Path(cfg.policy.previous).resolve()), previous_policy_sha256=previous.sha256,
                    policy_path=str(Path(cfg.policy.path).resolve()), policy_sha256=policy.sha256,
                    triage=cfg.section("triage"), training=training,
                    holdout_fraction=cfg.evaluation.holdout_fraction if cfg.evaluation.enabled else 0.0,
                    evaluation_prompts=cfg.evaluation.max_prompts if cfg.evaluation.enabled else None, run=run,
                )
                report_path = diffed.artifacts["report"]["path"]
                report = Path(report_path).read_text(encoding="utf-8")
                c.log_artifact(pid, report_path, "policy_diff")
                manifest["policy_diff"] = report_path
                from prefect.artifacts import create_markdown_artifact

                create_markdown_artifact(
                    key=artifact_key(cfg.run.name, "policy-diff"), markdown=report,
                    description=f"What the change from policy.previous to policy.path does to the pairs of run {cfg.run.name!r}",
                )
            if cfg.approval.required and reaches("reference"):
                decision = await_approval(
                    report or render_triage_report(
                        {t.value: triaged.metrics.get(f"triage_{t.value}", 0) for t in TriageType},
                        {t.value: triaged.metrics.get(f"train_{t.value}", 0) for t in TriageType},
                        f"{policy.name or cfg.policy.path} ({policy.sha256[:12]})",
                    ),
                    workdir=workdir, run_name=cfg.run.name, mlflow_run_id=pid,
                    timeout_s=cfg.approval.timeout_s, poll_s=cfg.approval.poll_s,
                )
                manifest["approval"] = {"approved": True, "note": decision.note}
                c.set_tag(pid, "approval", "approved" + (f": {decision.note}" if decision.note else ""))
        if reaches("reference"):
            ref = run_stage(
                reference_stage, "reference", fresh_set, stages,
                shards=triaged.artifacts, model=cfg.section("model"), model_sha256=model_sha, weights=cfg.section("weights"),
                # Only what the stage reads: other training settings (learning rate, steps) keep its cache.
                training=cfg.training.reference_view().model_dump(mode="json"), triage=cfg.section("triage"),
                input_files_sha256=_inputs_for(files, "weights"), policy_sha256=policy.sha256, seed=cfg.run.seed, run=run,
            )
            _log_weight_plot(c, pid, ref, workdir)
        if reaches("train"):
            trained = run_stage(
                train_stage, "train", fresh_set, stages,
                shards=triaged.artifacts, reference=ref.artifacts, model=cfg.section("model"), model_sha256=model_sha,
                training=training, triage=cfg.section("triage"), policy_sha256=policy.sha256,
                seed=cfg.run.seed, registered_model_name=registered if cfg.mlflow.register_model else None, run=run,
            )
        if reaches("evaluate") and cfg.evaluation.enabled:
            run_stage(
                evaluate_stage, "evaluate", fresh_set, stages,
                shards=triaged.artifacts, trained=trained.artifacts, model=cfg.section("model"),
                model_sha256=model_sha, evaluation=cfg.section("evaluation"), training=training,
                input_files_sha256=_inputs_for(files, "evaluation", "oracle"), oracle=oracle,
                policy_path=str(Path(cfg.policy.path).resolve()), policy_sha256=policy.sha256,
                seed=cfg.run.seed, run=run,
            )
        status = "FINISHED"
    except GateClosed as closed:
        status = "KILLED"
        manifest["approval"] = {"approved": False, "state": closed.state_name, "message": str(closed)}
        c.set_tag(pid, "approval", f"{closed.state_name.lower()}: {closed}")
        raise
    finally:
        manifest["status"] = manifest.get("approval", {}).get("state", "").upper() or status
        for stage, info in stages.items():
            if info.get("mlflow_run_id"):
                c.set_tag(pid, f"stage.{stage}.run_id", info["mlflow_run_id"])
                c.set_tag(pid, f"stage.{stage}.cached", str(info["cached"]).lower())
        for stage, info in stages.items():
            tracking.log_metrics(c, pid, {f"{stage}.{k}": v for k, v in info["metrics"].items()})
            # What this run spent on the stage (a cached stage: the cache lookup).
            tracking.log_metrics(c, pid, {f"{stage}.seconds": info["seconds"], f"{stage}.peak_rss_mib": info["peak_rss_mib"]})
        if "model_preparation" in manifest:
            tracking.log_metrics(c, pid, {f"model_preparation.{k}": v for k, v in manifest["model_preparation"].items()})
        model_id = stages.get("train", {}).get("info", {}).get("model_id")
        if model_id:  # the realigned model (and its registered version) shows on the parent run too
            tracking.log_model_output(c, pid, model_id)
        c.set_tag(pid, tracking.DESCRIPTION_TAG, tracking.run_description(manifest))
        runs = Path(workdir, "runs")
        path = write_json_at(manifest, runs / pid / "manifest.json")
        write_json_at({"run_id": pid, "manifest": str(path), "tracking_uri": uri}, runs / "last.json")
        c.log_artifact(pid, str(path))
        c.set_terminated(pid, status=status)
        manifest["manifest_path"] = str(path)
    return manifest


def _flow_run_id() -> str | None:
    """The Prefect flow run this realign run is (None outside one)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context is not None and context.flow_run is not None else None


def _cached_plot(workdir: Path, name: str, key: object, render) -> Path:
    """``<workdir>/cache/plots/<sha12 of key>/<name>``, drawn by ``render(path)`` the first time only:
    a rerun answered from the stage cache logs the same picture without loading matplotlib again."""
    folder = Path(workdir, "cache", "plots", text_sha256([name, key])[:12])
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            os.replace(render(Path(tmp) / name), path)  # never a half-written picture under the final name
    return path


def _log_triage_plot(c, pid, triaged: StageResult, workdir: Path) -> None:
    counts = {t.value: triaged.metrics.get(f"triage_{t.value}", 0) for t in TriageType}
    png = _cached_plot(workdir, "triage_counts.png", counts, lambda path: plots.bar_chart(counts, "triage", "pairs", path))
    c.log_artifact(pid, str(png), "plots")


def _log_weight_plot(c, pid, ref: StageResult, workdir: Path) -> None:
    table = ref.artifacts["weights"]

    def render(path: Path) -> Path:
        rows = read_parquet(table["path"]).to_pylist()
        weights = [r["weight"] for r in rows if r["kind"] != "retain"]  # the weights table's kind column (README's schemas)
        return plots.histogram(weights, "impact weights (conflict samples)", "w_i", path)

    if any(kind != "retain" for kind in read_parquet(table["path"]).column("kind").to_pylist()):
        c.log_artifact(pid, str(_cached_plot(workdir, "impact_weights.png", table["sha256"], render)), "plots")
