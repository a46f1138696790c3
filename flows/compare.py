"""The compare flow: several methods (and seeds, and oracle-noise rates) on the same data, one table.

Each variant is a realign run (a subflow) in the same working folder, so the stages that do not
depend on the method are computed once and served from the stage cache to every other variant:
load, judge and triage always (for one noise rate), the reference stage wherever its settings
agree. Every variant trains on the same triaged training pairs for the same number of optimizer
steps and is evaluated on the same held-out prompts; the comparison's MLflow run is the parent of
the variants' runs and holds the table and its plots.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

from prefect import flow

from trace_realign.core.errors import ConfigError
from trace_realign.flows.config import PipelineConfig, check_methods, check_noise_rates
from trace_realign.flows.realign import realign, run_stage
from trace_realign.flows.workdir import workdir_lock
from trace_realign.tasks import tracking
from trace_realign.tasks.artifacts import write_json_at
from trace_realign.tasks.common import RunContext
from trace_realign.tasks.compare import comparison_report
from trace_realign.tasks.evaluate import head_to_head_stage

def variant_config(config: dict, method: str, seed: int, max_steps: int | None, noise_rate: float | None = None) -> dict:
    """``config`` with ``training.method = method``, ``run.seed = seed``, the run named after them,
    ``training.max_steps`` (when given), ``triage.noise.rate = noise_rate`` (when given; the mode and
    seed of the config's ``triage.noise``, else its defaults; rate 0: no ``triage.noise``) and no
    model registration (a comparison trains candidates, not a release)."""
    out = copy.deepcopy(config)
    out["training"]["method"] = method
    if max_steps is not None:
        out["training"]["max_steps"] = max_steps
    out["run"]["seed"] = seed
    name = f"{config['run']['name']}-{method}-seed{seed}"
    if noise_rate is not None:
        # Rate 0 is the run without noise: it shares the triage stage (and all after it) with one.
        out["triage"]["noise"] = {**(out["triage"].get("noise") or {}), "rate": noise_rate} if noise_rate > 0 else None
        name += f"-noise{noise_rate:g}"
    out["run"]["name"] = name
    out["mlflow"]["register_model"] = False
    return out


def _note(pairs: int | None, steps: int | None, prompts: int | None, equal_steps: bool) -> str:
    parts = [
        f"Equal data: every method trained on the same {pairs} triaged training pairs (one load, judge and triage)"
        if pairs is not None else "Equal data: every method trained on the same triaged training pairs",
        f"for the same {steps} optimizer steps" if equal_steps and steps is not None else "for the steps its own samples give (--steps config)",
        f"and was evaluated on the same {int(prompts)} held-out prompts." if prompts is not None else "and was evaluated on the same held-out prompts.",
    ]
    return " ".join(parts) + (
        " samples: the training samples a method builds from those pairs (a pair gives one sample or more; "
        "the baselines drop pairs they have no use for). Cells: mean ± half-width of the 95% Student-t "
        "interval over seeds; the starting model's row holds the before values."
    )


@flow(name="compare", log_prints=True)
def compare(
    config: dict, methods: list[str], seeds: int = 1, equal_steps: bool = True, progress: bool = True,
    noise_rates: list[float] | None = None,
) -> dict:
    """Realign with each of ``methods`` for ``seeds`` seeds (``run.seed``, ``run.seed + 1``, ...)
    on ``config`` and compare them; returns the comparison manifest (``table``, ``markdown``,
    ``variants`` with each realign run's manifest path). With ``noise_rates`` every method runs at
    each oracle-noise rate (``triage.noise.rate``; the robustness study of arXiv 2511.02623): one
    row per method and rate; the judge's verdicts are shared by all, triage is redone per rate.

    With ``equal_steps`` every variant trains for the optimizer steps of the first one (its own
    ``training.max_steps``, or what one pass over its samples gives), so methods that build fewer
    samples from the same pairs see them more often. Raises ConfigError for an unknown method,
    no seeds, or a config without the evaluate stage.
    """
    cfg = PipelineConfig.model_validate(config)
    methods = check_methods(methods)
    noise_rates = check_noise_rates(noise_rates)
    if seeds < 1:
        raise ConfigError(f"--seeds: at least 1, got {seeds}")
    if not cfg.evaluation.enabled:
        raise ConfigError("compare: evaluation.enabled is false; a comparison needs the evaluate stage")
    workdir = Path(cfg.run.workdir).resolve()
    with workdir_lock(workdir, f"trace-realign compare {cfg.run.name!r}"):
        return _compare(cfg, workdir, methods, seeds, equal_steps, progress, noise_rates)


def _compare(
    cfg: PipelineConfig, workdir: Path, methods: list[str], seeds: int, equal_steps: bool, progress: bool,
    noise_rates: list[float] | None,
) -> dict:
    uri = tracking.tracking_uri(workdir, cfg.mlflow.tracking_uri)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, cfg.mlflow.experiment, workdir)
    tracking.close_dead_runs(c, exp, workdir)
    run = c.create_run(
        exp,
        tags={"mlflow.runName": f"{cfg.run.name}-compare", "trace.kind": "compare", **tracking.process_tags(workdir)},
    )
    cid = run.info.run_id
    seed_list = [cfg.run.seed + i for i in range(seeds)]
    tracking.log_params(
        c, cid,
        {"compare": {
            "methods": ",".join(methods), "seeds": ",".join(map(str, seed_list)), "equal_steps": equal_steps,
            "noise_rates": "" if noise_rates is None else ",".join(f"{r:g}" for r in noise_rates),
        }},
    )  # fmt: skip
    base = cfg.model_dump(mode="json")
    base["approval"] = {**base["approval"], "required": False}  # a comparison's runs never pause
    steps = cfg.training.max_steps if cfg.training.max_steps > 0 else None
    variants: list[dict] = []
    runs: list[dict] = []
    manifests: list[dict] = []
    pairs = prompts = None
    status = "FAILED"
    try:
        for rate, method, seed in ((r, m, s) for r in (noise_rates or [None]) for m in methods for s in seed_list):
            manifest = realign(
                variant_config(base, method, seed, steps if equal_steps else None, rate),
                progress=progress, parent_run_id=cid,
            )
            stages = manifest["stages"]
            trained = stages["train"]["metrics"]
            evaluation = stages["evaluate"]["metrics"]
            if equal_steps and steps is None:
                steps = int(trained["global_step"])
            pairs = stages["triage"]["metrics"]["train_total"]
            prompts = evaluation.get("n")
            variants.append(
                {
                    "method": method, "noise_rate": rate, "seed": seed, "metrics": evaluation,
                    "samples": trained.get("samples"), "steps": int(trained["global_step"]),
                }
            )
            manifests.append(manifest)
            runs.append(
                {"method": method, "seed": seed, "noise_rate": rate, "run_id": manifest["run_id"], "manifest": manifest["manifest_path"]}
            )
        ctx = RunContext(str(workdir), uri, cfg.mlflow.experiment, cid, progress)
        _head_to_head(variants, manifests, ctx)
        note = _note(pairs, steps, prompts, equal_steps) + (
            f" h2h_*: the method's answers against {methods[0]}'s on the same prompts and seed, each pair judged "
            "in both orders (a win must win both)." if len(methods) > 1 else ""
        )
        report = comparison_report(variants, note, run=ctx.as_dict())
        out = {
            "run_id": cid,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "methods": methods,
            "seeds": seed_list,
            "noise_rates": noise_rates,
            "equal_steps": equal_steps,
            "steps": steps,
            "variants": runs,
            "table": report["table"],
            "artifacts": report["artifacts"],
            "markdown": report["markdown"],
        }
        path = write_json_at(out, workdir / "runs" / cid / "comparison.json")
        write_json_at({"run_id": cid, "manifest": str(path), "tracking_uri": uri}, workdir / "runs" / "last_comparison.json")
        c.log_artifact(cid, str(path))
        status = "FINISHED"
    finally:
        c.set_terminated(cid, status=status)
    return {**out, "manifest_path": str(path)}


def _head_to_head(variants: list[dict], manifests: list[dict], ctx: RunContext) -> None:
    """For each noise rate and seed, the win rate of every other method's generations against the
    first method's (:func:`~trace_realign.tasks.evaluate.head_to_head_stage`, a cached stage under the
    comparison's run), added to that variant's metrics as ``h2h_win_rate``, ``h2h_tie_rate`` and
    ``h2h_loss_rate``."""
    first: dict[tuple, dict] = {}
    for variant, manifest in zip(variants, manifests):
        key = (variant["noise_rate"], variant["seed"])
        if key not in first:
            first[key] = manifest
            continue
        base = first[key]
        files = {k: v["sha256"] for k, v in manifest["input_files"].items() if k.split(".", 1)[0] in ("evaluation", "oracle")}
        result = run_stage(
            head_to_head_stage, "head-to-head", set(), {},
            generations_a=manifest["stages"]["evaluate"]["artifacts"]["generations"],
            generations_b=base["stages"]["evaluate"]["artifacts"]["generations"],
            shards=manifest["stages"]["triage"]["artifacts"], evaluation=manifest["config"]["evaluation"],
            oracle=manifest["config"]["oracle"], input_files_sha256=files, policy_path=manifest["policy"]["path"],
            policy_sha256=manifest["policy"]["sha256"], seed=variant["seed"], run=ctx.as_dict(),
        )  # fmt: skip
        variant["metrics"] = {
            **variant["metrics"], **{f"h2h_{k}": v for k, v in result.metrics.items() if k.endswith("_rate")}
        }
