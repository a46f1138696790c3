"""``trace-realign``: the command-line interface.

    trace-realign run --config F [--set k=v ...] [--until STAGE] [--fresh STAGE] [--approval]
    trace-realign diff --config F --against OLD_POLICY [--policy NEW_POLICY]
    trace-realign approve [--workdir DIR] [--reject] [--note TEXT]
    trace-realign compare --config F --methods trace,naive_relabel_dpo [--seeds N] [--noise-rates 0,0.1]
    trace-realign prepare-model NAME
    trace-realign show [--workdir DIR]
    trace-realign ui [--workdir DIR] [--port N]
    trace-realign watch --config F [--interval S] [--cron EXPR] [--server URL] [--pool NAME]
    trace-realign deploy --config F --pool NAME [--pool-type TYPE] [--server URL]
    trace-realign run --config F --pool NAME [--server URL] [--wait]
    trace-realign server start|stop|status [--port N]

Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trace_realign.flows.settings import SERVER_STARTUP_SETTING, prefect_environment

EXIT_USER_ERROR = 2
EXIT_GATE_CLOSED = 3
"""A run rejected at the approval gate, or left without a decision until it expired: nothing trained."""

def _quiet_libraries() -> None:
    """Prefect logs a failed task's traceback and the libraries chat on stderr; the CLI reports
    the one-line cause and its own progress bars instead."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow's "Downloading artifacts" bars (registering the model) are not the run's progress.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:  # read when a stage first imports it: a run answered from the cache never loads transformers
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info = None
            record.exc_text = None
            return "Traceback" not in record.getMessage()

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine", "prefect"):
        logging.getLogger(name).addFilter(_NoTraceback())


def _print_summary(manifest: dict) -> None:
    from trace_realign.tasks import tracking

    stages = manifest.get("stages", {})
    print()
    print(f"{'stage':<20} {'cached':<7} {'seconds':>8} {'peak MiB':>9}  mlflow run")
    for stage, info in stages.items():
        peak = info.get("peak_rss_mib")  # manifests written before it was recorded have none
        print(
            f"{stage:<20} {str(info['cached']).lower():<7} {info.get('seconds', 0.0):>8.1f} "
            f"{'' if peak is None else f'{peak:.0f}':>9}  {info.get('mlflow_run_id') or ''}"
        )
    preparation = manifest.get("model_preparation")
    if preparation:
        print(f"{'(model prepared)':<20} {'':<7} {preparation['seconds']:>8.1f} {preparation['peak_rss_mib']:>9.0f}")
    evaluation = stages.get("evaluate", {}).get("metrics", {})
    if evaluation:
        print()
        print(f"{'metric':<32} {'before':>10} {'after':>10}")
        for key, before, after in tracking.before_after(evaluation):
            print(f"{key:<32} {before:>10.2f} {after:>10.2f}")
        for key in tracking.SUMMARY_KEYS:
            if key in evaluation:
                print(f"{key:<32} {evaluation[key]:>21.3f}")
    print()
    print(f"manifest: {manifest['manifest_path']}")
    uri = manifest["config"]["mlflow"]["tracking_uri"]
    if uri and tracking.serves_artifacts(uri):
        experiment = tracking.client(uri).get_run(manifest["run_id"]).info.experiment_id
        print(f"browse runs: {tracking.ui_link(uri, experiment, manifest['run_id'])}")
    else:
        print(f"browse runs: trace-realign ui --workdir {manifest['config']['run']['workdir']}")


def _in_workdir(args, command: str, run_flow) -> int:
    """Load and check the config, then, holding its working folder's lock with Prefect's local
    server kept there, call ``run_flow(cfg)``; a local server that does not start is one line."""
    from trace_realign.flows.config import load_config

    cfg = load_config(args.config, args.set, args.preset)
    from trace_realign.core.assets import KNOWN_MODELS, is_prepared
    from trace_realign.core.errors import TraceError
    from trace_realign.flows.preflight import preflight
    from trace_realign.flows.workdir import workdir_lock

    preflight(cfg)
    # The lock comes first: Prefect's local server keeps its database in the working folder.
    with workdir_lock(cfg.run.workdir, f"trace-realign {command} {cfg.run.name!r}"):
        os.environ.update(prefect_environment(cfg.run.workdir, args.verbose))
        if not os.environ.get("PREFECT_API_URL"):
            from trace_realign.flows.server import running_user_server

            url = running_user_server()  # `trace-realign server start` left one running: no temporary server
            if url:
                os.environ["PREFECT_API_URL"] = url
        if cfg.approval.required and not os.environ.get("PREFECT_API_URL"):
            raise TraceError(
                "approval.required: a paused run waits on a Prefect server a person can reach, and the temporary one "
                "stops with this command; start one with 'trace-realign server start' (or set PREFECT_API_URL)"
            )
        if cfg.model.path in KNOWN_MODELS and not is_prepared(cfg.model.path):
            print(f"preparing {cfg.model.path} once: {KNOWN_MODELS[cfg.model.path].description}", flush=True)
        _quiet_libraries()
        try:
            return run_flow(cfg)
        except RuntimeError as exc:
            if "ephemeral Prefect API server" not in str(exc):
                raise
            raise TraceError(
                f"Prefect's local server did not answer within {os.environ[SERVER_STARTUP_SETTING]} s "
                f"({SERVER_STARTUP_SETTING}): raise it on a busy machine, or set PREFECT_API_URL to a running server"
            ) from None


def cmd_run(args) -> int:
    if args.pool:
        from trace_realign.flows.deploy import submit

        manifest = submit(args)
        if manifest is not None:
            _print_summary(manifest)
        return 0

    def run_flow(cfg) -> int:
        manifest = _realign_or_gate(cfg, until=args.until, fresh=args.fresh, progress=not args.no_progress, rejudge=args.rejudge)
        if manifest is None:
            return EXIT_GATE_CLOSED
        _print_summary(manifest)
        return 0

    if args.approval:
        args.set = [*args.set, "approval.required=true"]
    return _in_workdir(args, "run", run_flow)


def _realign_or_gate(cfg, **kwargs) -> dict | None:
    """Run the realign flow; its manifest, or None (after one line on stderr) when the run ended at
    the approval gate: rejected (a Cancelled state) or without a decision in time (Prefect fails an
    expired pause). Any other failure raises as the flow raised it."""
    from trace_realign.flows.realign import realign

    state = realign(cfg.model_dump(mode="json"), return_state=True, **kwargs)
    if not state.is_completed():
        last = Path(cfg.run.workdir, "runs", "last.json")
        try:
            manifest = json.loads(Path(json.loads(last.read_text(encoding="utf-8"))["manifest"]).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError):
            manifest = {}
        gate = manifest.get("approval") or {}
        if manifest.get("flow_run_id") == str(state.state_details.flow_run_id) and gate.get("approved") is False:
            print(f"trace-realign: {gate['state'].lower()}: {gate['message']}", file=sys.stderr)
            return None
    return state.result()


def cmd_diff(args) -> int:
    """Judge the pairs under the previous and the new policy (cached verdicts reused) and report the
    policy diff; nothing is trained."""
    args.set = [*args.set, f"policy.previous={Path(args.against).resolve()}"]
    if args.policy:
        args.set.append(f"policy.path={Path(args.policy).resolve()}")

    def run_flow(cfg) -> int:
        manifest = _realign_or_gate(cfg.model_copy(update={"approval": cfg.approval.model_copy(update={"required": False})}),
                                    until="triage", progress=not args.no_progress)
        report = Path(manifest["policy_diff"])
        print(report.read_text(encoding="utf-8"))
        asked = manifest.get("judge_requests", 0)
        if cfg.oracle.backend == "annotations":
            print(f"judge questions: {asked}, answered from the pairs' annotations (nothing to pay)")
        else:
            print(f"judge requests paid by this diff: {asked} (the rest came from the verdict cache)")
        print(f"report: {report}")
        return 0

    return _in_workdir(args, "diff", run_flow)


def cmd_approve(args) -> int:
    from trace_realign.flows.approval import send_decision

    record = send_decision(args.workdir, approve=not args.reject, note=args.note or "", api_url=args.server)
    print(f"{'rejected' if args.reject else 'approved'} flow run {record['flow_run_id']} ({record.get('run_name')})")
    return 0


def _noise_rates(text: str | None) -> list[float] | None:
    """``--noise-rates 0,0.1,0.2`` as floats (checked by :func:`check_noise_rates`); None when not given."""
    from trace_realign.core.errors import ConfigError
    from trace_realign.flows.config import check_noise_rates

    if text is None:
        return None
    try:
        return check_noise_rates([float(r) for r in text.split(",") if r.strip()])
    except ValueError:
        raise ConfigError(f"--noise-rates: '{text}' is not a comma-separated list of shares such as 0,0.1,0.2") from None


def cmd_compare(args) -> int:
    from trace_realign.flows.config import check_methods

    # Checked before anything imports Prefect: its settings must come from prefect_environment().
    check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    noise_rates = _noise_rates(args.noise_rates)

    def run_flow(cfg) -> int:
        from trace_realign.flows.compare import compare

        out = compare(
            cfg.model_dump(mode="json"), [m.strip() for m in args.methods.split(",") if m.strip()], seeds=args.seeds,
            equal_steps=args.steps == "equal", progress=not args.no_progress, noise_rates=noise_rates,
        )
        print()
        print(out["markdown"])
        print(f"comparison: {out['manifest_path']}")
        print(f"browse runs: trace-realign ui --workdir {cfg.run.workdir}")
        return 0

    return _in_workdir(args, "compare", run_flow)


def cmd_prepare_model(args) -> int:
    from trace_realign.core.assets import prepare_model

    print(prepare_model(args.name, Path(args.cache_dir) if args.cache_dir else None))
    return 0


def _last(workdir: str) -> dict:
    from trace_realign.core.errors import TraceError

    pointer = Path(workdir, "runs", "last.json")
    if not pointer.is_file():
        raise TraceError(f"{pointer}: no run yet in this working folder (run 'trace-realign run --config ...' first)")
    return json.loads(pointer.read_text())


def cmd_show(args) -> int:
    last = _last(args.workdir)
    manifest = json.loads(Path(last["manifest"]).read_text())
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"run {manifest['run_id']}  status {manifest.get('status')}  created {manifest['created']}")
    print(f"policy {manifest['policy'].get('name')} v{manifest['policy'].get('version')} sha256 {manifest['policy']['sha256'][:12]}")
    print(f"data {manifest['data']['path']} sha256 {manifest['data']['sha256'][:12]}  model {manifest['model']['spec']}")
    manifest["manifest_path"] = last["manifest"]
    _print_summary(manifest)
    return 0


def _last_run_link(workdir: str, uri: str, server: str) -> str:
    """The UI's page of the working folder's last run when it is in store ``uri`` (in the UI's
    model-training view: :func:`~trace_realign.tasks.tracking.ui_link`), else the UI's address."""
    from mlflow.exceptions import MlflowException

    from trace_realign.tasks import tracking

    last = Path(workdir, "runs", "last.json")
    if not last.is_file():
        return server
    record = json.loads(last.read_text(encoding="utf-8"))
    if record.get("tracking_uri") != uri:
        return server
    try:
        experiment = tracking.client(uri).get_run(record["run_id"]).info.experiment_id
    except MlflowException:  # the run was purged since (trace-realign gc, mlflow gc)
        return server
    return tracking.ui_link(server, experiment, record["run_id"])


def cmd_ui(args) -> int:
    """The MLflow UI on the run store until Ctrl-C or SIGTERM; the server (its own process group)
    stops with the command either way."""
    import signal
    import subprocess

    from trace_realign.tasks.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(args.workdir, None)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on {_last_run_link(args.workdir, uri, f'http://127.0.0.1:{args.port}')} (store {uri}); Ctrl-C stops it", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Both set explicitly: a process started in the background of a script inherits SIGINT ignored,
    # and would otherwise never stop on Ctrl-C or leave its server behind.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        from trace_realign.flows.watch import stop_process_group

        if proc.poll() is None:
            stop_process_group(proc)


def _run_options(parser: argparse.ArgumentParser) -> None:
    """--set, --preset, --no-progress and --verbose: what every command that runs the flow takes."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME", help="lay a preset's settings over the config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's and MLflow's logs")


def build_parser() -> argparse.ArgumentParser:
    from trace_realign.flows.stages import STAGES

    ap = argparse.ArgumentParser(prog="trace-realign", description="Realign a model to a changed policy (TRACE).")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the realign flow once on the embedded local Prefect server")
    run.add_argument("--config", required=True)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    run.add_argument("--preset", action="append", default=[], metavar="NAME", help="lay a preset's settings over the config (paper: the authors' settings)")
    run.add_argument("--until", default="evaluate", choices=STAGES, help="stop after this stage")
    run.add_argument("--fresh", action="append", default=[], choices=STAGES, help="recompute this stage and what follows")
    run.add_argument(
        "--rejudge", action="store_true",
        help="ask the judge again for every verdict, known ones included (pays for them again); implies --fresh judge",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--verbose", action="store_true", help="show Prefect's and MLflow's logs")
    run.add_argument(
        "--pool", default=None, metavar="NAME",
        help="submit the run to the realign deployment on this Prefect work pool (see deploy): a worker runs it, not this command",
    )
    run.add_argument("--server", default=None, metavar="URL", help="with --pool: Prefect API URL of the server; default: PREFECT_API_URL")
    run.add_argument("--wait", action="store_true", help="with --pool: wait for the run to finish and print its summary")
    run.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="with --wait: stop waiting after S seconds (the run goes on)")
    run.add_argument(
        "--approval", action="store_true",
        help="pause after triage until a person approves (Prefect UI or trace-realign approve); needs a Prefect server (trace-realign server start)",
    )
    run.set_defaults(func=cmd_run)
    diff = sub.add_parser("diff", help="what a policy change does to the pairs (triage matrix, moved pairs, cost), before any training")
    diff.add_argument("--config", required=True)
    diff.add_argument("--against", required=True, metavar="OLD_POLICY", help="the policy the pairs and the model were aligned under")
    diff.add_argument("--policy", default=None, metavar="NEW_POLICY", help="the new policy (default: the config's policy.path)")
    _run_options(diff)
    diff.set_defaults(func=cmd_diff)
    appr = sub.add_parser("approve", help="approve (or --reject) the run waiting at the approval gate in a working folder")
    appr.add_argument("--workdir", default=".trace")
    appr.add_argument("--reject", action="store_true", help="end the run, nothing trained")
    appr.add_argument("--note", default=None, help="why (kept in the run's manifest)")
    appr.add_argument("--server", default=None, metavar="URL", help="Prefect API URL (default: the one the waiting run uses)")
    appr.set_defaults(func=cmd_approve)
    comp = sub.add_parser("compare", help="realign with several methods (and seeds) on the same data and compare them in one table")
    comp.add_argument("--config", required=True)
    comp.add_argument("--methods", required=True, help="comma-separated: trace,naive_relabel_dpo,robust_dpo,npo,...")
    comp.add_argument("--seeds", type=int, default=1, help="seeds per method (run.seed, run.seed+1, ...); 2 or more give 95%% intervals")
    comp.add_argument(
        "--steps", choices=("equal", "config"), default="equal",
        help="equal: every method trains for the first method's optimizer steps (default); config: as each method's samples give",
    )
    comp.add_argument(
        "--noise-rates", default=None, metavar="R1,R2",
        help="also run each method at these oracle-noise rates (triage.noise.rate), e.g. 0,0.1,0.2: the paper's robustness study",
    )
    _run_options(comp)
    comp.set_defaults(func=cmd_compare)
    prep = sub.add_parser("prepare-model", help="prepare a known model once (smollm2-135m-instruct, smollm2-135m-instruct-old-policy, tiny-random)")
    prep.add_argument("name")
    prep.add_argument("--cache-dir", default=None)
    prep.set_defaults(func=cmd_prepare_model)
    show = sub.add_parser("show", help="the last run's manifest and metrics")
    show.add_argument("--workdir", default=".trace")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    ui = sub.add_parser("ui", help="start the MLflow UI on the run store")
    ui.add_argument("--workdir", default=".trace")
    ui.add_argument("--tracking-uri", default=None)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    watch = sub.add_parser("watch", help="serve deployments that realign whenever the policy changes")
    watch.add_argument("--config", required=True)
    watch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    watch.add_argument("--preset", action="append", default=[], metavar="NAME")
    watch.add_argument("--interval", type=float, default=60.0, help="seconds between policy checks")
    watch.add_argument("--cron", default=None, help="also realign on this schedule")
    watch.add_argument("--server", default=None, help="Prefect API URL of a running server; default: start one")
    watch.add_argument("--until", default="evaluate", choices=STAGES, help="the stage each triggered run stops after")
    watch.add_argument("--pool", default=None, metavar="NAME", help="put the realign deployment on this work pool: its workers run the triggered runs")
    watch.add_argument("--pool-type", default=None, metavar="TYPE", help="the type of the work pool when it is created (default process)")
    watch.add_argument(
        "--approval", action="store_true",
        help="each triggered run shows the policy diff and pauses after triage until approved (Prefect UI or trace-realign approve)",
    )
    watch.set_defaults(func=lambda a: __import__("trace_realign.flows.watch", fromlist=["cmd_watch"]).cmd_watch(a))
    dep = sub.add_parser("deploy", help="register the realign flow as a deployment on a Prefect work pool (created if missing)")
    dep.add_argument("--config", required=True)
    dep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dep.add_argument("--preset", action="append", default=[], metavar="NAME")
    dep.add_argument("--pool", required=True, metavar="NAME", help="the work pool whose workers run the deployment")
    dep.add_argument("--pool-type", default=None, metavar="TYPE", help="the type of the work pool when it is created (default process)")
    dep.add_argument("--server", default=None, metavar="URL", help="Prefect API URL of the server holding the pool; default: PREFECT_API_URL")
    dep.add_argument("--until", default="evaluate", choices=STAGES, help="the stage the deployment's runs stop after")
    dep.set_defaults(func=lambda a: __import__("trace_realign.flows.deploy", fromlist=["cmd_deploy"]).cmd_deploy(a))
    srv = sub.add_parser("server", help="start, stop or check a Prefect server that run and compare use instead of a temporary one")
    srv.add_argument("action", choices=("start", "stop", "status"))
    srv.add_argument("--port", type=int, default=None, help="the port on 127.0.0.1 (default: a free one)")
    srv.set_defaults(func=lambda a: __import__("trace_realign.flows.server", fromlist=["cmd_server"]).cmd_server(a))
    gc = sub.add_parser("gc", help="delete what the last runs do not need (dry run unless --yes)")
    gc.add_argument("--workdir", default=".trace")
    gc.add_argument("--keep", type=int, default=3, help="keep the last N runs and everything they reference")
    gc.add_argument("--tracking-uri", default=None, help="the MLflow store, when the runs used another one")
    gc.add_argument("--yes", action="store_true", help="delete (without it: only show what would go)")
    gc.set_defaults(func=lambda a: __import__("trace_realign.flows.gc", fromlist=["cmd_gc"]).cmd_gc(a))
    return ap


def main(argv: list[str] | None = None) -> int:
    from trace_realign.core.errors import TraceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TraceError as exc:
        print(f"trace-realign: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trace-realign: interrupted; finished work is cached, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
