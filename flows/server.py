"""A Prefect server as the commands address it: API and UI URLs, health, connecting, settings,
deployment names; starting and stopping one (``watch``'s own, and the per-user server of
``trace-realign server start``, which ``run`` and ``compare`` use instead of a temporary one).
Imports no Prefect at module level (it reads its settings when first imported)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from trace_realign.core.errors import ConfigError, TraceError

SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 5.0


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


def connect(server: str) -> str:
    """The API URL of a running server given as ``--server``, checked with ``/health``."""
    api_url = api_url_of(server)
    if not healthy(api_url, timeout=5.0):
        raise TraceError(f"Prefect server not reachable at {api_url} (GET {api_url}/health failed)")
    return api_url


def use_prefect_settings(env: dict[str, str]) -> None:
    """Apply Prefect settings from ``env``; refresh them if Prefect was imported before."""
    os.environ.update(env)
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def deployment_name(run_name: str) -> str:
    """``run.name`` as a Prefect deployment name: Prefect refuses ``/ % & > <`` in names, which
    become ``-`` (``team/smoke`` -> ``team-smoke``; the original is in the deployment's description)."""
    mapped = re.sub(r"[/%&><]", "-", run_name).strip() or "trace-realign"
    return mapped


# --- a server this project starts: prefect server start on 127.0.0.1 --------------------------------


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
    from trace_realign.flows.settings import prefect_environment

    env = {**os.environ, **prefect_environment(workdir)}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{Path(env['PREFECT_HOME']) / 'server.db'}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def server_log_path(workdir: str | Path) -> Path:
    """Where a started server's output goes (its console would drown the watcher's lines)."""
    return Path(workdir).resolve() / "watch" / "server.log"


def launch_server(workdir: str | Path, port: int, log_path: Path | None = None) -> subprocess.Popen:
    """Start ``prefect server start`` on 127.0.0.1:``port`` without waiting for it to be healthy.

    Its home and database are in ``workdir/prefect``; its output goes to ``log_path``
    (default :func:`server_log_path`)."""
    log_path = log_path or server_log_path(workdir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches watch only, which then stops the server
        # (and its worker processes) as one group.
        return subprocess.Popen(
            cmd, env=server_environment(workdir), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def wait_healthy(
    proc: subprocess.Popen, api_url: str, log_path: Path, timeout: float = SERVER_START_TIMEOUT_S,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Wait until the started server answers ``/health``; one-line TraceError if it dies or times out.
    Returns early when ``stop()`` says the user asked to stop."""
    deadline = time.monotonic() + timeout
    while not healthy(api_url, timeout=1.0) and not stop():
        if proc.poll() is not None:
            raise TraceError(f"prefect server exited during start-up (exit {proc.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            raise TraceError(f"prefect server not healthy at {api_url} after {timeout:.0f} s; see {log_path}")
        time.sleep(0.25)


# --- the per-user server: trace-realign server start|stop|status -----------------------------------


def user_server_home() -> Path:
    """Where ``trace-realign server start`` keeps its server: database, log and state file
    (``~/.cache/trace-realign/prefect-server``, under ``$TRACE_REALIGN_HOME`` when set)."""
    from trace_realign.core.assets import user_home

    return user_home() / "prefect-server"


def _state_path() -> Path:
    return user_server_home() / "prefect" / "server.json"


def _read_state() -> dict:
    try:
        return json.loads(_state_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_prefect_server(pid: int) -> bool:
    """Whether ``pid`` is (still) a ``prefect server start`` process: a recycled pid is not ours to stop."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"prefect" in cmdline and b"server" in cmdline and b"start" in cmdline


def running_user_server(timeout: float = 1.0) -> str | None:
    """The API URL of the server ``trace-realign server start`` left running, if it answers ``/health``."""
    url = _read_state().get("api_url")
    return url if url and healthy(url, timeout=timeout) else None


def start_user_server(port: int | None = None, timeout: float = SERVER_START_TIMEOUT_S) -> tuple[str, bool]:
    """Start the per-user Prefect server (detached: it outlives this process) unless one answers.

    Returns ``(api_url, started)``. Raises TraceError (one line, naming the log) when it does not
    become healthy within ``timeout`` seconds.
    """
    url = running_user_server()
    if url:
        return url, False
    home = user_server_home()
    port = port or free_port()
    log_path = home / "server.log"
    proc = launch_server(home, port, log_path)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(proc, url, log_path, timeout)
    except TraceError:
        stop_process_group(proc)
        raise
    state = {"api_url": url, "pid": proc.pid, "started": dt.datetime.now(dt.timezone.utc).isoformat(), "log": str(log_path)}
    tmp = _state_path().with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, _state_path())
    return url, True


def stop_user_server(timeout: float = SERVER_STOP_TIMEOUT_S) -> bool:
    """Stop the per-user server (SIGTERM to its process group, SIGKILL after ``timeout``); False if none ran."""
    state = _read_state()
    pid = state.get("pid")
    stopped = False
    if isinstance(pid, int) and _is_prefect_server(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_prefect_server(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    with contextlib.suppress(FileNotFoundError):
        _state_path().unlink()
    return stopped


def cmd_server(args) -> int:
    """``trace-realign server start|stop|status``."""
    if args.action == "start":
        url, started = start_user_server(args.port)
        print(f"Prefect server {'started' if started else 'already running'}: {ui_url_of(url)}")
        print("trace-realign run and compare use it (unless PREFECT_API_URL names another); stop it with: trace-realign server stop")
    elif args.action == "stop":
        print("Prefect server stopped" if stop_user_server() else "no Prefect server was running")
    else:
        url = running_user_server()
        print(f"Prefect server running: {ui_url_of(url)}" if url else "no Prefect server running (start one: trace-realign server start)")
        return 0 if url else 1
    return 0
