"""Work pools: the realign flow as a deployment that Prefect workers run.

``trace-realign deploy --config F --pool NAME`` registers ``realign/<run.name>`` on the work pool
``NAME`` of a running Prefect server (``--server URL`` or ``PREFECT_API_URL``), creating the pool
(type ``process`` unless ``--pool-type`` says otherwise) when it is missing. A worker started with
``prefect worker start --pool NAME`` then runs the deployment's flow runs, each in a process of
its own. ``trace-realign run --config F --pool NAME`` registers the deployment the same way and
submits one flow run to it; it prints the run's id and UI address and, with ``--wait``, waits
for the worker to finish it and prints its summary. ``trace-realign watch --pool NAME`` puts the
realign deployment on the pool too, so the policy watcher's runs go to the workers.

The deployment carries the validated config (its working folder made absolute: a worker's flow
run starts in a folder of its own) and a few environment settings for the flow run (its job
variables): the flow's result is stored in the working folder's result store, so a submitter on a
machine that sees that folder reads the run's manifest from it, and telemetry is off. Nothing
secret is written there: job variables are stored on the server. Stages are cached in the working
folder exactly as for ``run``, so a second submission with nothing changed is answered from the
cache, whichever worker runs it.

Nothing here imports Prefect at module level (see :mod:`trace_realign.flows.server`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.flows.settings import QUIET_LIBRARIES, prefect_environment
from trace_realign.flows.server import connect, deployment_name, ui_url_of, use_prefect_settings

DEFAULT_POOL_TYPE = "process"
POLL_SECONDS = 1.0
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def deployment_parameters(cfg, until: str) -> dict[str, Any]:
    """The realign flow's parameters for a deployed run of ``cfg`` (a :class:`PipelineConfig`).

    The working folder is made absolute (a served or pooled run starts in another folder); runs
    wait for the folder's lock (``workdir_wait_s=None``) and draw no progress bars.
    """
    config = cfg.model_dump(mode="json")
    config["run"]["workdir"] = str(Path(cfg.run.workdir).resolve())
    return {"config": config, "until": until, "progress": False, "workdir_wait_s": None}


def flow_run_environment(workdir: str | Path) -> dict[str, str]:
    """The environment a pooled flow run gets on top of its worker's (the deployment's ``env``).

    Its result (the run manifest) is persisted in ``<workdir>/prefect/results``, telemetry is off,
    libraries keep quiet on the worker's console, and the run logs at INFO to the server.
    """
    env = prefect_environment(workdir)
    env.pop("PREFECT_HOME")  # the worker's own
    return {
        **env,
        **QUIET_LIBRARIES,
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }


def realign_deployment(cfg, config_path: str | Path, until: str, description: str, cron: str | None = None, pool: str | None = None):
    """The ``realign/<run.name>`` deployment (a Prefect ``RunnerDeployment``), not yet registered.

    With ``pool`` it goes to that work pool with :func:`flow_run_environment` as its job
    variables; without, it is served (``watch``). Raises ConfigError naming ``--cron`` when Prefect
    refuses the expression.
    """
    from prefect.types.entrypoint import EntrypointType

    from trace_realign.flows.realign import realign

    name = deployment_name(cfg.run.name)
    renamed = f" (run.name {cfg.run.name!r})" if name != cfg.run.name else ""
    pooled: dict[str, Any] = {}
    if pool:
        pooled = {"work_pool_name": pool, "job_variables": {"env": flow_run_environment(cfg.run.workdir)}}
    try:
        return realign.to_deployment(
            name=name,
            parameters=deployment_parameters(cfg, until),
            cron=cron,
            description=f"Realign to the policy of {config_path}{renamed}; {description}",
            tags=["trace-realign"],
            # Runs load the flow by module path: it works from any folder the package imports in.
            entrypoint_type=EntrypointType.MODULE_PATH,
            **pooled,
        )
    except ValueError:
        if not cron:
            raise
        raise ConfigError(f"--cron {cron!r}: not a valid cron expression (minute hour day month weekday)") from None


def ensure_pool(client, pool: str, pool_type: str | None) -> Any:
    """The work pool ``pool``, created with ``pool_type`` (default ``process``) when missing.

    Raises ConfigError when an existing pool's type differs from an explicit ``pool_type``, or
    when no worker type of that name is installed here to give the new pool its job template
    (create such a pool with ``prefect work-pool create`` where its worker package is installed).
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.base import BaseWorker

    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        if pool_type and existing.type != pool_type:
            raise ConfigError(f"--pool-type {pool_type}: work pool {pool!r} exists with type {existing.type!r}")
        return existing
    kind = pool_type or DEFAULT_POOL_TYPE
    worker = BaseWorker.get_worker_class_from_type(kind)
    if worker is None:
        raise ConfigError(
            f"--pool-type {kind}: no Prefect worker of that type is installed here; create the pool where it is "
            f"(prefect work-pool create {pool} --type {kind}) and deploy to it"
        )
    return client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=worker.get_default_base_job_template()))


def use_server(server: str | None, workdir: str | Path) -> str:
    """Point Prefect at the server ``--server`` names (else ``PREFECT_API_URL``) and return its API URL.

    Raises ConfigError when neither is given (a work pool lives on a server), TraceError when the
    server does not answer ``/health``.
    """
    url = server or os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigError("--pool needs a running Prefect server: give --server URL or set PREFECT_API_URL")
    api_url = connect(url)
    use_prefect_settings({**prefect_environment(workdir), "PREFECT_API_URL": api_url})
    return api_url


def register(cfg, config_path: str | Path, pool: str, pool_type: str | None, until: str, cron: str | None = None) -> tuple[str, Any]:
    """Create the pool if missing and register ``realign/<run.name>`` on it (replacing an earlier
    registration of that name). Prefect must already point at the server (:func:`use_server`).

    Returns ``(deployment full name, work pool)``.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        work_pool = ensure_pool(client, pool, pool_type)
    deployment = realign_deployment(cfg, config_path, until, f"run by the workers of work pool {pool}", cron=cron, pool=pool)
    deployment.apply(work_pool_name=pool)
    return f"realign/{deployment.name}", work_pool


def pickup_seconds(states: list) -> dict[str, float]:
    """Seconds from a flow run's first state (scheduled at submission) to its first PENDING (a worker
    took it) and RUNNING (its process started the flow); keys missing while not reached yet."""
    ordered = sorted(states, key=lambda s: s.timestamp)
    if not ordered:
        return {}
    start = ordered[0].timestamp
    out: dict[str, float] = {}
    for state in ordered:
        key = {"PENDING": "pending", "RUNNING": "running"}.get(state.type.value)
        if key and key not in out:
            out[key] = (state.timestamp - start).total_seconds()
    return out


def wait_for_run(client, flow_run_id, timeout: float | None = None, poll: float = POLL_SECONDS):
    """Poll the flow run until it reaches a final state; returns it. ``timeout`` (seconds, None: no
    limit) raises TraceError naming the run, which keeps going on its worker."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.type.value in FINAL_STATES:
            return run
        if deadline is not None and time.monotonic() > deadline:
            state = run.state.name if run.state else "no state"
            raise TraceError(f"--wait-timeout: flow run {flow_run_id} still {state} after {timeout:g} s; it keeps going on its worker")
        time.sleep(poll)


def submit(args) -> dict[str, Any] | None:
    """``trace-realign run --pool NAME``: submit one flow run of the registered ``realign/<run.name>``
    with this config, print its id and UI address; with ``args.wait`` wait for it and print how long
    the worker took to pick it up.

    The run takes the config, ``--until``, ``--fresh`` and ``--rejudge`` given here as its
    parameters, so it runs what the command line says whatever was deployed; submitting imports
    neither torch nor the flow. Returns the run manifest when the run was waited for and its result
    is readable here (the submitter sees the working folder), else None. Raises ConfigError when
    the deployment is missing or on another pool, TraceError when the run did not complete.
    """
    from trace_realign.flows.config import load_config
    from trace_realign.flows.preflight import preflight

    cfg = load_config(args.config, args.set, args.preset)
    preflight(cfg)
    api_url = use_server(args.server, cfg.run.workdir)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"realign/{deployment_name(cfg.run.name)}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"--pool {args.pool}: no deployment {name} on {api_url}; register it first: "
                f"trace-realign deploy --config {args.config} --pool {args.pool}"
            ) from None
    if deployment.work_pool_name != args.pool:
        raise ConfigError(
            f"--pool {args.pool}: {name} is deployed to work pool {deployment.work_pool_name!r}; "
            f"deploy it to {args.pool} (trace-realign deploy --config {args.config} --pool {args.pool}) or submit to that pool"
        )
    parameters = deployment_parameters(cfg, args.until)
    if args.fresh or args.rejudge:
        parameters.update(fresh=list(args.fresh), rejudge=args.rejudge)
    run = run_deployment(name=name, parameters=parameters, timeout=0, as_subflow=False, tags=["trace-realign"])
    print(f"submitted flow run {run.id} of {name} to work pool {args.pool}", flush=True)
    print(f"flow run: {ui_url_of(api_url)}/runs/flow-run/{run.id}", flush=True)
    if not args.wait:
        print(f"a worker runs it: prefect worker start --pool {args.pool}", flush=True)
        return None
    with get_client(sync_client=True) as client:
        try:
            done = wait_for_run(client, run.id, timeout=args.wait_timeout)
        except KeyboardInterrupt:
            print(f"stopped waiting; flow run {run.id} keeps going on its worker", file=sys.stderr, flush=True)
            raise
        took = pickup_seconds(client.read_flow_run_states(run.id))
    if "running" in took:
        print(
            f"picked up by a worker: pending after {took.get('pending', float('nan')):.1f} s, running after {took['running']:.1f} s "
            f"(process id {done.infrastructure_pid or '?'})",
            flush=True,
        )
    if done.state.type.value != "COMPLETED":
        message = " ".join((done.state.message or "").split())[:300]
        raise TraceError(f"flow run {run.id} ended {done.state.name}" + (f": {message}" if message else ""))
    try:
        return done.state.result()
    except Exception as exc:  # stored where this machine cannot read it (another host's folder)
        print(f"the run's manifest is in its working folder on the worker's side ({' '.join(str(exc).split())[:200]})", flush=True)
        return None


def cmd_deploy(args) -> int:
    """``trace-realign deploy``: register the realign deployment on a work pool; returns 0."""
    from trace_realign.flows.config import load_config
    from trace_realign.flows.preflight import preflight

    cfg = load_config(args.config, args.set, args.preset)
    preflight(cfg)
    api_url = use_server(args.server, cfg.run.workdir)
    name, work_pool = register(cfg, args.config, args.pool, args.pool_type, args.until)
    print(f"deployed {name} to work pool {work_pool.name} ({work_pool.type}) on {api_url}", flush=True)
    print(f"start a worker: PREFECT_API_URL={api_url} prefect worker start --pool {work_pool.name}", flush=True)
    print(f"submit a run:   trace-realign run --config {args.config} --pool {work_pool.name} --server {api_url} [--wait]", flush=True)
    return 0
