"""``trace-realign watch``: realign whenever the policy document changes.

Prefect has no file-change trigger, so ``watch`` serves two deployments on a real Prefect server:

* ``realign/<run.name>``: the realign flow with the validated config as its parameter, optionally on
  a cron schedule (``--cron``);
* ``policy-watcher/<run.name>``: a small flow on an interval (``--interval``) that hashes the policy
  document (:attr:`trace_core.policy.Policy.sha256`, the canonical content hash), compares it with
  the last hash it saw, and on a change starts exactly one realign run with ``run_deployment``.

The last hash lives in ``<workdir>/watch/policy_state.json`` (written atomically), so restarting
``watch`` does not start a spurious run. Exactly-once starts rest on three things: ticks take a file
lock, so two overlapping ticks cannot both see the same change; the new hash and a pending start
(with a fresh idempotency key) are written *before* the run is requested; and a pending start left
by a failed request is retried with the same key, which the server answers with the run it already
made instead of a second one.

The server is either started here (``prefect server start`` on 127.0.0.1, in its own process group,
stopped with the whole group on exit) or, with ``--server URL``, a running one.

Nothing here imports Prefect at module level: Prefect reads its settings when it is first imported,
and :func:`cmd_watch` must set ``PREFECT_HOME`` and ``PREFECT_API_URL`` before that.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trace_core.errors import ConfigError, TraceError
from trace_core.policy import load_policy

SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0
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
    from tasks.artifacts import write_json_at

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
        # timeout=0: return once the run is created (the served realign deployment runs it);
        # as_subflow=False: a realign run stands on its own, not as a child of one watcher tick.
        run = run_deployment(
            name=deployment, timeout=0, idempotency_key=key, as_subflow=False,
            flow_run_name=f"policy-{sha[:8]}", tags=["policy-change"],
        )
        return str(run.id)

    def log(line: str) -> None:
        # The run log feeds the UI; stdout is the watch console, where Prefect's own INFO lines are off.
        logger.info(line)
        print(line, file=sys.stdout, flush=True)

    return check_policy(Path(state_path), policy_path, start_realign, log=log)


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


def api_url_of(server: str) -> str:
    """The API URL for ``--server``: a bare ``http://host:port`` (the UI address) gets ``/api``."""
    url = server.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--server {server!r}: expected a URL such as http://127.0.0.1:4200/api")
    return url + "/api" if parts.path in ("", "/") else url


def ui_url_of(api_url: str) -> str:
    """The Prefect UI's address for an API URL (a self-hosted server serves the UI at its root)."""
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = SERVER_STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    # Whatever outlived SIGTERM (the leader, or a worker process it left behind) goes now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def server_environment(workdir: str | Path) -> dict[str, str]:
    """The started server's environment: Prefect home in the working folder, analytics off.

    Its database is ``<workdir>/prefect/server.db``, not the default ``prefect.db``, which the
    temporary server of a concurrent ``trace-realign run`` in the same folder uses.
    """
    from flows.cli import prefect_environment

    env = {**os.environ, **prefect_environment(workdir)}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{Path(env['PREFECT_HOME']) / 'server.db'}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def server_log_path(workdir: str | Path) -> Path:
    """Where a started server's output goes (its console would drown the watcher's lines)."""
    return Path(workdir).resolve() / "watch" / "server.log"


def launch_server(workdir: str | Path, port: int) -> subprocess.Popen:
    """Start ``prefect server start`` on 127.0.0.1:``port`` without waiting for it to be healthy."""
    log_path = server_log_path(workdir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches watch only, which then stops the server
        # (and its worker processes) as one group.
        return subprocess.Popen(
            cmd, env=server_environment(workdir), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def wait_healthy(proc: subprocess.Popen, api_url: str, log_path: Path, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait until the started server answers ``/health``; one-line TraceError if it dies or times out."""
    deadline = time.monotonic() + timeout
    while not healthy(api_url, timeout=1.0):
        if proc.poll() is not None:
            raise TraceError(f"prefect server exited during start-up (exit {proc.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            raise TraceError(f"prefect server not healthy at {api_url} after {timeout:.0f} s; see {log_path}")
        time.sleep(0.25)


def connect(server: str) -> str:
    """The API URL of a running server given as ``--server``, checked with ``/health``."""
    api_url = api_url_of(server)
    if not healthy(api_url, timeout=5.0):
        raise TraceError(f"Prefect server not reachable at {api_url} (GET {api_url}/health failed)")
    return api_url


# --- the command -----------------------------------------------------------------------------------


def watch_environment(workdir: str | Path, api_url: str) -> dict[str, str]:
    """Prefect settings for watch: ``run``'s (home etc. in the workdir) on the server at ``api_url``.

    Served runs log at INFO to the server, where the UI shows them; the console shows errors only
    (a failed run, a lost server), next to the watcher's own lines.
    """
    from flows.cli import prefect_environment

    return {
        **prefect_environment(workdir),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
    }


def _use_prefect_settings(env: dict[str, str]) -> None:
    """Apply Prefect settings from ``env``; refresh them if Prefect was imported before."""
    os.environ.update(env)
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def build_deployments(cfg, config_path: str, interval: float, cron: str | None, until: str) -> list:
    """The realign deployment (config as parameter, optional cron) and the policy watcher on an interval."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.realign import realign

    name = cfg.run.name
    policy_path = str(Path(cfg.policy.path).resolve())
    try:
        realign_deployment = realign.to_deployment(
            name=name,
            parameters={"config": cfg.model_dump(mode="json"), "until": until, "progress": False},
            cron=cron,
            # One realign at a time: runs share the working folder's caches; a later one waits.
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description=f"Realign to the policy of {config_path}; started by the policy watcher on a change",
            tags=["trace-realign"],
            # Runs load the flow by module path: it works from any folder the package imports in.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    except ValueError:
        if not cron:
            raise
        raise ConfigError(f"--cron {cron!r}: not a valid cron expression (minute hour day month weekday)") from None
    watcher_deployment = sys.modules[__name__].policy_watcher.to_deployment(
        name=name,
        interval=interval,
        # A tick due while the previous one still runs is dropped, not queued: on a busy machine
        # queued ticks would pile up and hold the runner's process slots the realign run needs.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={
            "policy_path": policy_path,
            "state_path": str(state_path_for(cfg.run.workdir)),
            "deployment": f"realign/{name}",
        },
        description=f"Hashes {policy_path} every {interval:g} s and starts realign/{name} when it changes",
        tags=["trace-realign"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # The module path Prefect derives names the function the flow wraps; a run must load the flow.
    watcher_deployment.entrypoint = f"{__name__}.policy_watcher"
    return [realign_deployment, watcher_deployment]


def cmd_watch(args) -> int:
    """Serve the realign and policy-watcher deployments until Ctrl-C (or SIGTERM); returns 0.

    A started server boots while Prefect and the realign flow are imported (both take seconds), and
    is stopped, with its whole process group, however watch ends.
    """
    from flows.preflight import preflight
    from flows.stages import STAGES
    from trace_core.config import load_config

    cfg = load_config(args.config, args.set)
    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval:g}: must be a positive number of seconds")
    until = getattr(args, "until", None) or "evaluate"
    if until not in STAGES:
        raise ConfigError(f"--until: unknown stage '{until}' (stages: {', '.join(STAGES)})")
    preflight(cfg)
    workdir = Path(cfg.run.workdir).resolve()
    name = cfg.run.name
    server: subprocess.Popen | None = None
    try:
        if args.server:
            api_url = connect(args.server)
            print(f"connected to the Prefect server at {api_url}; UI: {ui_url_of(api_url)}", flush=True)
        else:
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            print(f"starting a Prefect server at {api_url} (log: {server_log_path(workdir)}) ...", flush=True)
            server = launch_server(workdir, port)
        # Before the first Prefect import: Prefect reads its settings once, when imported.
        _use_prefect_settings(watch_environment(workdir, api_url))
        deployments = build_deployments(cfg, args.config, args.interval, args.cron, until)
        if server is not None:
            wait_healthy(server, api_url, server_log_path(workdir))
            print(f"started a Prefect server at {api_url}; UI: {ui_url_of(api_url)} (stopped when watch stops)", flush=True)
        state = record_baseline(state_path_for(workdir), cfg.policy.path)
        print(f"policy {state['policy_path']} sha256 {state['sha256'][:12]}, checked every {args.interval:g} s", flush=True)
        cron = f" (cron {args.cron!r})" if args.cron else ""
        print(f"serving realign/{name}{cron} and {WATCHER_FLOW_NAME}/{name}; Ctrl-C stops", flush=True)
        from prefect import serve

        # query_seconds: the runner looks for due runs at least as often as the watcher ticks.
        serve(*deployments, print_starting_message=False, query_seconds=max(1.0, min(args.interval, 10.0)))
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop_process_group(server)
    print("watch stopped", flush=True)
    return 0
