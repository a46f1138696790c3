"""``trace-realign watch``: realign whenever the policy document changes.

Prefect has no file-change trigger, so ``watch`` serves two deployments on a real Prefect server:

* ``realign/<run.name>``: the realign flow with the validated config as its parameter, optionally on
  a cron schedule (``--cron``);
* ``policy-watcher/<run.name>``: a small flow on an interval (``--interval``) that hashes the policy
  document (:attr:`trace_realign.core.policy.Policy.sha256`, the canonical content hash), compares it with
  the last hash it saw, and on a change starts exactly one realign run with ``run_deployment``.

With ``--pool NAME`` the realign deployment is registered on that Prefect work pool instead
(:func:`trace_realign.flows.deploy.register`) and only the watcher is served: the runs it starts
are executed by the pool's workers, and neither stopping nor restarting ``watch`` touches them.

The last hash lives in ``<workdir>/watch/policy_state.json`` (written atomically), so restarting
``watch`` does not start a spurious run. Exactly-once starts rest on three things: ticks take a file
lock, so two overlapping ticks cannot both see the same change; the new hash and a pending start
(with a fresh idempotency key) are written *before* the run is requested; and a pending start left
by a failed request is retried with the same key, which the server answers with the run it already
made instead of a second one.

Nothing here relies on a slot a dead process could hold. The deployments carry no Prefect
concurrency limit (a run killed while it held a deployment slot kept the slot on the server, and
every later tick was cancelled): realign runs queue on the working folder's lock
(:mod:`trace_realign.flows.workdir`, released by the kernel when a process dies), ticks on the state file's lock.
When ``watch`` starts it recovers what an earlier, interrupted ``watch`` left behind: realign runs
it had in flight are scheduled again (their finished stages are cached), stale ticks are marked
crashed.

Processes: ``watch`` is a supervisor. It starts (or connects to) the server, then runs Prefect's
``serve`` in a child process in its own session, so a Ctrl-C at the terminal reaches ``watch``
only. The first Ctrl-C (or SIGTERM) asks the child to stop (SIGTERM: Prefect's runner cancels the
runs in flight and returns); after ``STOP_GRACE_S`` seconds, or at a second Ctrl-C, the child and
the flow runs it started are killed. The server ``watch`` started is stopped last, after everything
that reports to it has gone: Prefect drains its event queue at interpreter exit with retries per
event and no overall bound, so a process that outlived its server took minutes to exit (7 s per
queued event, measured). Shutdown therefore takes a few seconds, never more than about
``STOP_GRACE_S + SERVER_STOP_TIMEOUT_S``.

The server is either started here (``prefect server start`` on 127.0.0.1, in its own process group,
stopped with the whole group on exit) or, with ``--server URL``, a running one.

Nothing here imports Prefect at module level: Prefect reads its settings when it is first imported,
and the serving process must set ``PREFECT_HOME`` and ``PREFECT_API_URL`` before that.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.policy import load_policy
from trace_realign.flows.shutdown import exit_quietly_on_sigterm_at_shutdown

# api_url_of too: callers (and the tests) address the server helpers through this module as well.
from trace_realign.flows.server import (  # noqa: F401
    SERVER_START_TIMEOUT_S,
    SERVER_STOP_TIMEOUT_S,
    api_url_of,
    connect,
    deployment_name,
    free_port,
    healthy,
    launch_server,
    server_environment,
    server_log_path,
    stop_process_group,
    ui_url_of,
    use_prefect_settings,
    wait_healthy,
)

STOP_GRACE_S = 8.0  # how long the serving process may take to stop before it is killed
BEFORE_STOP_S = 3.0  # how long watch spends noting the realign runs in flight before it stops them
RUN_SLOTS = 4  # flow runs the serving process runs at once (a local limit: it dies with the process)
# A policy file modified less than this long ago may still be being written by an editor: the tick
# leaves it to the next one rather than start a run on half a document.
SETTLE_SECONDS = 1.0
WATCHER_FLOW_NAME = "policy-watcher"


# --- the policy state and one watcher tick (no Prefect needed: unit-testable) ----------------------


def state_path_for(workdir: str | Path) -> Path:
    """Where ``watch`` keeps the last policy hash it saw for this working folder."""
    return Path(workdir).resolve() / "watch" / "policy_state.json"


def read_state(path: Path) -> dict[str, Any]:
    """The stored state, or ``{}`` when there is none yet (or it is unreadable: start afresh)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically, so a crash leaves the old or the new state, never half."""
    from trace_realign.tasks.artifacts import write_json_at

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_at(state, path)


@contextlib.contextmanager
def state_lock(path: Path) -> Iterator[None]:
    """An exclusive lock for read-compare-write of the state (watcher ticks may overlap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def snapshot_path(state_path: Path, sha256: str) -> Path:
    """Where the watcher keeps the text of a policy version it recorded (the next realign run diffs
    against it: the edited file no longer holds it)."""
    return Path(state_path).parent / "policies" / f"{sha256[:16]}.md"


def snapshot_policy(state_path: Path, policy_path: str | Path, sha256: str) -> Path | None:
    """Copy the policy file to :func:`snapshot_path` if its content still hashes to ``sha256``
    (else it changed since it was hashed: the next tick records the new version); the path or None."""
    final = snapshot_path(state_path, sha256)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    try:
        tmp.write_bytes(Path(policy_path).read_bytes())
        if load_policy(tmp).sha256 != sha256:
            return None
        os.replace(tmp, final)
        return final
    except (OSError, TraceError):
        return None
    finally:
        tmp.unlink(missing_ok=True)


def record_baseline(state_path: Path, policy_path: str | Path) -> dict[str, Any]:
    """Record the policy's hash if this folder has none for this policy yet; never starts a run.

    Called when ``watch`` starts, so the first check of a new watch only records, and an edit made
    right after start-up is already a change. A stored hash for the same policy is kept: an edit made
    while ``watch`` was stopped is then seen (and realigned) by the first tick.
    """
    policy_path = str(Path(policy_path).resolve())
    with state_lock(state_path):
        state = read_state(state_path)
        if state.get("policy_path") == policy_path and state.get("sha256"):
            return state
        state = {"policy_path": policy_path, "sha256": load_policy(policy_path).sha256, "changes": 0, "recorded": _now()}
        write_state(state_path, state)
        snapshot_policy(state_path, policy_path, state["sha256"])
        return state


Trigger = Callable[[str, str], str]
"""``trigger(idempotency_key, new_sha256) -> flow run id``: start one realign run."""


def check_policy(state_path: Path, policy_path: str | Path, trigger: Trigger, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """One watcher tick: compare the policy's hash with the stored one; on a change, start one run.

    Returns ``{"status": ..., ...}`` with status one of ``recorded`` (first sight: hash stored, no
    run), ``unchanged``, ``settling`` (modified under a second ago), ``invalid`` (the policy does not
    parse: nothing recorded, so fixing it is compared with the last good hash), ``triggered``.
    A failing ``trigger`` raises after the new hash and the pending start are stored; the next tick
    retries that start with the same idempotency key.
    """
    policy_path = str(Path(policy_path).resolve())
    with state_lock(state_path):
        state = read_state(state_path)
        pending = state.get("pending")
        if pending:
            # A start that failed (or whose answer was lost) after the change was stored: the same
            # key makes the server return the run if it did make it, so this never starts two.
            run_id = trigger(pending["key"], pending["sha256"])
            state = {**state, "pending": None, "last_run_id": run_id}
            write_state(state_path, state)
            log(f"policy {pending['sha256'][:12]}: started realign run {run_id} (retried)")
        if state.get("policy_path") != policy_path or not state.get("sha256"):
            baseline = {"policy_path": policy_path, "sha256": None, "changes": 0}
            try:
                baseline["sha256"] = load_policy(policy_path).sha256
            except TraceError as exc:
                log(f"policy not recorded: {exc}")
                return {"status": "invalid", "error": str(exc)}
            write_state(state_path, {**baseline, "recorded": _now()})
            snapshot_policy(state_path, policy_path, baseline["sha256"])
            return {"status": "recorded", "sha256": baseline["sha256"]}
        try:
            if time.time() - Path(policy_path).stat().st_mtime < SETTLE_SECONDS:
                return {"status": "settling"}
            sha = load_policy(policy_path).sha256
        except (OSError, TraceError) as exc:
            log(f"policy not checked: {exc}")
            return {"status": "invalid", "error": str(exc)}
        if sha == state["sha256"]:
            return {"status": "unchanged", "sha256": sha}
        previous = state["sha256"]
        pending = {"key": f"trace-realign-policy-{uuid.uuid4().hex}", "sha256": sha, "previous": previous}
        state = {**state, "sha256": sha, "changes": int(state.get("changes", 0)) + 1, "changed": _now(), "pending": pending}
        write_state(state_path, state)
        snapshot_policy(state_path, policy_path, sha)
        run_id = trigger(pending["key"], sha)
        write_state(state_path, {**state, "pending": None, "last_run_id": run_id})
        log(f"policy changed {previous[:12]} -> {sha[:12]}: started realign run {run_id}")
        return {"status": "triggered", "sha256": sha, "previous": previous, "flow_run_id": run_id}


def watch_policy(policy_path: str, state_path: str, deployment: str) -> dict[str, Any]:
    """The watcher flow's body: one :func:`check_policy` tick that starts ``deployment`` on a change."""
    from prefect.deployments import run_deployment
    from prefect.logging import get_run_logger

    logger = get_run_logger()

    def start_realign(key: str, sha: str) -> str:
        # The version the change replaced, kept when it was recorded: the run reports the diff against it.
        previous = (read_state(Path(state_path)).get("pending") or {}).get("previous")
        snapshot = snapshot_path(Path(state_path), previous) if previous else None
        parameters = {"previous_policy": str(snapshot)} if snapshot is not None and snapshot.is_file() else {}
        # timeout=0: return once the run is created (the served realign deployment runs it);
        # as_subflow=False: a realign run stands on its own, not as a child of one watcher tick.
        run = run_deployment(
            name=deployment, timeout=0, idempotency_key=key, as_subflow=False, parameters=parameters,
            flow_run_name=f"policy-{sha[:8]}", tags=["policy-change"],
        )
        return str(run.id)

    def log(line: str) -> None:
        # The run log feeds the UI; stdout is the watch console, where Prefect's own INFO lines are off.
        logger.info(line)
        print(line, file=sys.stdout, flush=True)

    try:
        return check_policy(Path(state_path), policy_path, start_realign, log=log)
    finally:
        exit_quietly_on_sigterm_at_shutdown()


def __getattr__(name: str) -> Any:
    """``policy_watcher``, the watcher flow, is built on first use (PEP 562).

    Building it imports Prefect, which must wait until :func:`cmd_watch` has set Prefect's
    environment; a served run's process loads the flow by this name (``flows.watch.policy_watcher``).
    """
    if name == "policy_watcher":
        from prefect import flow

        watcher = globals()["policy_watcher"] = flow(name=WATCHER_FLOW_NAME)(watch_policy)
        return watcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the Prefect server: start one or connect to one ----------------------------------------------


# --- the command ---------------------------------------------------------------------------------


def watch_environment(workdir: str | Path, api_url: str) -> dict[str, str]:
    """Prefect settings for watch: ``run``'s (home etc. in the workdir) on the server at ``api_url``.

    Served runs log at INFO to the server, where the UI shows them; the console shows errors only
    (a failed run, a lost server), next to the watcher's own lines: no library warnings or progress
    bars from the runs either.
    """
    from trace_realign.flows.settings import QUIET_LIBRARIES, prefect_environment

    return {
        **prefect_environment(workdir),
        **QUIET_LIBRARIES,
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
        "PYTHONUNBUFFERED": "1",
    }


def build_deployments(cfg, config_path: str, interval: float, cron: str | None, until: str) -> list:
    """The realign deployment (config as parameter, optional cron) and the policy watcher on an interval.

    Neither carries a Prefect concurrency limit (see the module doc): realign runs wait for the
    working folder's lock (``workdir_wait_s=None``), ticks serialise on the state file's lock.
    """
    from trace_realign.flows.deploy import realign_deployment

    realign = realign_deployment(cfg, config_path, until, "started by the policy watcher on a change", cron=cron)
    return [realign, watcher_deployment(cfg, interval)]


def watcher_deployment(cfg, interval: float):
    """``policy-watcher/<run.name>`` on an interval of ``interval`` seconds: each tick starts
    ``realign/<run.name>`` (served, or on a work pool) when the policy changed."""
    from prefect.types.entrypoint import EntrypointType

    name = deployment_name(cfg.run.name)
    renamed = f" (run.name {cfg.run.name!r})" if name != cfg.run.name else ""
    policy_path = str(Path(cfg.policy.path).resolve())
    deployment = sys.modules[__name__].policy_watcher.to_deployment(
        name=name,
        interval=interval,
        parameters={
            "policy_path": policy_path,
            "state_path": str(state_path_for(cfg.run.workdir)),
            "deployment": f"realign/{name}",
        },
        description=f"Hashes {policy_path} every {interval:g} s and starts realign/{name} when it changes{renamed}",
        tags=["trace-realign"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # The module path Prefect derives names the function the flow wraps; a run must load the flow.
    deployment.entrypoint = f"{__name__}.policy_watcher"
    return deployment


def interrupted_path(workdir: str | Path) -> Path:
    """Where ``watch`` notes the realign runs it stopped in flight, to resume them when it restarts."""
    return Path(workdir).resolve() / "watch" / "interrupted.json"


_LIVE_TYPES = ("PENDING", "RUNNING", "CANCELLING")


def _deployment_runs(client, deployment: str, state_types: tuple[str, ...]) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    try:
        dep = client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        return []
    live = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(t) for t in state_types])))
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])), flow_run_filter=live)


def note_interrupted(client, workdir: str | Path, realign_deployment: str) -> list[str]:
    """Record the realign runs in flight (about to be cancelled by a stopping ``watch``)."""
    ids = [str(r.id) for r in _deployment_runs(client, realign_deployment, _LIVE_TYPES)]
    if ids:
        from trace_realign.tasks.artifacts import write_json_at

        path = interrupted_path(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        earlier = read_state(path).get("runs", [])
        write_json_at({"runs": sorted(set(earlier) | set(ids))}, path)
    return ids


def recover_interrupted_runs(client, deployments: list, workdir: str | Path, log: Callable[[str], Any] = print) -> dict[str, int]:
    """Undo what an interrupted ``watch`` left on the server for these deployments.

    * Runs still pending, running or cancelling belong to no process once this ``watch`` serves the
      deployments (one watch per deployment name and server, see README): they are marked crashed.
      Realign runs are left alone while a run holds the working folder's lock.
    * Each realign run cut short by a stopping or dying ``watch`` (found so, or noted in
      :func:`interrupted_path` when ``watch`` stopped it) is started again as a new run with the
      same parameters; its finished stages are cached, so it resumes. The new run's idempotency key
      is derived from the old run's id, so it is started once however often recovery runs.

    Returns ``{"resumed": n, "crashed": n}``.
    """
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    from trace_realign.flows.workdir import WorkdirBusy, workdir_lock

    try:
        with workdir_lock(workdir, "trace-realign watch (recovery)"):
            realign_busy = False
    except WorkdirBusy:
        realign_busy = True
    counts = {"resumed": 0, "crashed": 0}
    noted = interrupted_path(workdir)
    to_resume = {rid: None for rid in read_state(noted).get("runs", [])}
    for deployment in deployments:
        full = f"{deployment.flow_name}/{deployment.name}"
        is_realign = deployment.flow_name == "realign"
        if is_realign and realign_busy:
            continue
        for run in _deployment_runs(client, full, _LIVE_TYPES):
            client.set_flow_run_state(run.id, Crashed(message="the watch serving this run stopped while it ran"), force=True)
            counts["crashed"] += 1
            if is_realign:
                to_resume[str(run.id)] = run
    if realign_busy:
        return counts
    realign = next((d for d in deployments if d.flow_name == "realign"), None)
    if realign is not None and to_resume:
        dep = client.read_deployment_by_name(f"realign/{realign.name}")
        for rid, run in to_resume.items():
            try:
                run = run or client.read_flow_run(rid)
            except ObjectNotFound:
                continue
            if run.state is not None and run.state.type.value in ("COMPLETED", "FAILED"):
                continue  # it finished after all, or failed on its own: nothing to resume
            new = client.create_flow_run_from_deployment(
                dep.id, parameters=run.parameters, idempotency_key=f"trace-realign-resume-{rid}",
                name=f"{run.name}-resumed", tags=["policy-change", "resumed"],
            )
            counts["resumed"] += 1
            log(f"realign run {rid} ({run.name}) was cut short when watch stopped: resumed as run {new.id}")
    noted.unlink(missing_ok=True)
    return counts


def drop_concurrency_limits(client, deployments: list) -> None:
    """Remove the deployment concurrency limits earlier versions of ``watch`` set (their slots could
    stay held by a run whose process died)."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    for deployment in deployments:
        try:
            dep = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
        except ObjectNotFound:
            continue
        if dep.global_concurrency_limit is not None:
            client.update_deployment(dep.id, DeploymentUpdate(concurrency_limit=None))


# --- the serving process ---------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """Kill this process group when the supervising ``watch`` is gone (it was killed outright)."""

    def check() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=check, name="watch-parent", daemon=True).start()


def serve_main(spec_path: str) -> int:
    """The serving process: recover, then ``serve`` the deployments until SIGTERM.

    ``spec_path`` is a JSON file written by :func:`cmd_watch` (config, config path, interval, cron,
    stage, parent pid). Prefect's runner stops on SIGTERM (it cancels the runs in flight and pauses
    the schedules); Prefect's queued events and logs are then flushed for at most a few seconds while
    the server is still up, and the process exits.
    """
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # watch stops this process with SIGTERM
    _exit_with_parent(int(spec["parent"]))
    from trace_realign.flows.config import validate_config

    cfg = validate_config(spec["config"], spec["config_path"])
    if spec.get("pool"):  # the realign deployment is on the work pool (cmd_watch registered it)
        deployments = [watcher_deployment(cfg, spec["interval"])]
    else:
        deployments = build_deployments(cfg, spec["config_path"], spec["interval"], spec["cron"], spec["until"])
    from prefect import serve
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            drop_concurrency_limits(client, deployments)
            recover_interrupted_runs(client, deployments, cfg.run.workdir, log=lambda line: print(line, flush=True))
    except Exception as exc:  # the server answers oddly: serve anyway, say what was not recovered
        print(f"trace-realign: could not recover runs an earlier watch left: {' '.join(str(exc).split())[:300]}", file=sys.stderr, flush=True)
    # query_seconds: the runner looks for due runs at least as often as the watcher ticks.
    serve(*deployments, print_starting_message=False, limit=RUN_SLOTS, query_seconds=max(1.0, min(spec["interval"], 10.0)))
    _flush_prefect(timeout=3.0)
    sys.stdout.flush()
    # What Prefect still has queued can only go to a server that is going away: do not wait on it.
    os._exit(0)


def _flush_prefect(timeout: float) -> None:
    """Send what Prefect's event and log workers still hold, waiting at most ``timeout`` seconds."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:
        return
    for worker in (EventsWorker, APILogWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


# --- the supervisor --------------------------------------------------------------------------------


def check_cron(cron: str, workdir: Path) -> None:
    """ConfigError naming ``--cron`` when Prefect would refuse the expression."""
    from trace_realign.flows.settings import prefect_environment

    use_prefect_settings(prefect_environment(workdir))  # before Prefect is first imported
    from prefect._internal.schemas.validators import validate_cron_string

    try:
        validate_cron_string(cron)
    except ValueError:
        raise ConfigError(f"--cron {cron!r}: not a valid cron expression (minute hour day month weekday)") from None


class Stop:
    """Ctrl-C and SIGTERM for ``watch``: the first asks for a graceful stop, the second forces one."""

    def __init__(self) -> None:
        self.signals = 0

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # Only count: printing here could re-enter a print the main thread is in the middle of.
        self.signals += 1

    @property
    def requested(self) -> bool:
        return self.signals >= 1

    @property
    def forced(self) -> bool:
        return self.signals >= 2


def _quietly(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        fn()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def supervise(
    child: subprocess.Popen, stop: Stop, grace: float = STOP_GRACE_S, before_stop: Callable[[], Any] = lambda: None
) -> int | None:
    """Wait for the serving process; on a stop request call ``before_stop()``, SIGTERM it, and kill
    its whole group after ``grace`` seconds or a second request. Returns its exit code, or None when
    it was stopped."""
    asked_at: float | None = None
    while True:
        code = child.poll()
        if code is not None:
            return None if asked_at is not None else code
        if stop.requested and asked_at is None:
            asked_at = time.monotonic()
            print("stopping watch (Ctrl-C again stops it at once) ...", flush=True)
            if not stop.forced:
                # Best effort, for a few seconds: a slow or lost server must not hold up the stop.
                helper = threading.Thread(target=_quietly, args=(before_stop,), daemon=True)
                helper.start()
                helper.join(timeout=BEFORE_STOP_S)
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        if asked_at is not None and (stop.forced or time.monotonic() - asked_at > grace):
            _kill_group(child)
            return None
        time.sleep(0.1)


def cmd_watch(args) -> int:
    """Serve the realign and policy-watcher deployments until Ctrl-C (or SIGTERM); returns 0.

    A second Ctrl-C stops at once (exit 130). A serving process that dies on its own ends watch
    with one line and exit 1.
    """
    from trace_realign.flows.preflight import preflight
    from trace_realign.flows.stages import STAGES
    from trace_realign.flows.config import load_config

    if getattr(args, "approval", False):
        args.set = [*args.set, "approval.required=true"]
    cfg = load_config(args.config, args.set, args.preset)
    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval:g}: must be a positive number of seconds")
    until = getattr(args, "until", None) or "evaluate"
    if until not in STAGES:
        raise ConfigError(f"--until: unknown stage '{until}' (stages: {', '.join(STAGES)})")
    preflight(cfg)
    workdir = Path(cfg.run.workdir).resolve()
    name = deployment_name(cfg.run.name)
    if args.cron:
        check_cron(args.cron, workdir)
    stop = Stop()
    stop.install()
    server: subprocess.Popen | None = None
    child: subprocess.Popen | None = None
    code = 0
    try:
        if args.server:
            api_url = connect(args.server)
            print(f"connected to the Prefect server at {api_url}; UI: {ui_url_of(api_url)}", flush=True)
        else:
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            print(f"starting a Prefect server at {api_url} (log: {server_log_path(workdir)}) ...", flush=True)
            server = launch_server(workdir, port)
            wait_healthy(server, api_url, server_log_path(workdir), stop=lambda: stop.requested)
            if not stop.requested:
                print(f"started a Prefect server at {api_url}; UI: {ui_url_of(api_url)} (stopped when watch stops)", flush=True)
        if not stop.requested:
            pool = getattr(args, "pool", None)
            cron = f" (cron {args.cron!r})" if args.cron else ""
            if pool:
                from trace_realign.flows.deploy import register

                use_prefect_settings(watch_environment(workdir, api_url))
                _, work_pool = register(cfg, args.config, pool, getattr(args, "pool_type", None), until, cron=args.cron)
                print(f"realign/{name}{cron} is on work pool {pool} ({work_pool.type}): its workers run it "
                      f"(PREFECT_API_URL={api_url} prefect worker start --pool {pool})", flush=True)
            state = record_baseline(state_path_for(workdir), cfg.policy.path)
            print(f"policy {state['policy_path']} sha256 {state['sha256'][:12]}, checked every {args.interval:g} s", flush=True)
            served = f"{WATCHER_FLOW_NAME}/{name}" if pool else f"realign/{name}{cron} and {WATCHER_FLOW_NAME}/{name}"
            print(f"serving {served}; Ctrl-C stops", flush=True)
            spec = workdir / "watch" / "serve.json"
            spec.parent.mkdir(parents=True, exist_ok=True)
            from trace_realign.tasks.artifacts import write_json_at

            write_json_at(
                {"config": cfg.model_dump(mode="json"), "config_path": str(args.config), "interval": args.interval,
                 "cron": args.cron, "until": until, "parent": os.getpid(), "pool": pool},
                spec,
            )
            child = subprocess.Popen(
                [sys.executable, "-c", "import sys; from trace_realign.flows.watch import serve_main; sys.exit(serve_main(sys.argv[1]))", str(spec)],
                env={**os.environ, **watch_environment(workdir, api_url)}, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            use_prefect_settings(watch_environment(workdir, api_url))

            def remember_runs_in_flight() -> None:
                from prefect.client.orchestration import get_client

                with get_client(sync_client=True) as client:
                    note_interrupted(client, workdir, f"realign/{name}")

            import prefect.client.orchestration  # noqa: F401  (now, not when the user is waiting for the stop)

            # Pooled realign runs belong to their workers: stopping watch leaves them running.
            exited = supervise(child, stop, before_stop=(lambda: None) if pool else remember_runs_in_flight)
            if exited is not None:
                code = 1
                print(f"trace-realign: error: the process serving the deployments exited (code {exited}); see the lines above", file=sys.stderr)
    finally:
        if child is not None and child.poll() is None:
            _kill_group(child)
        if server is not None:
            if stop.forced:
                _kill_group(server)
            else:
                stop_process_group(server)
    print("watch stopped", flush=True)
    return 130 if stop.forced else code
