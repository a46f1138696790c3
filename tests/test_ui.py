"""``trace-realign ui``: the MLflow server it starts stops with it, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from trace_realign.flows.watch import free_port
from tests.test_pipeline import ROOT
from tests.test_watch import descendants_of, wait_for


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def ignore_sigint() -> None:
    """As for a command started in the background of a script: SIGINT ignored from the start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, inherited",
    [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGINT, ignore_sigint)],
    ids=["sigterm", "ctrl-c", "ctrl-c-after-sigint-was-ignored"],
)
def test_the_mlflow_server_stops_with_the_ui_command(tmp_path, sig, inherited):
    port = free_port()
    log = open(tmp_path / "ui.log", "wb")  # a file, not a pipe nobody reads: the server writes to it too
    proc = subprocess.Popen(
        [sys.executable, "-m", "trace_realign.flows.cli", "ui", "--workdir", str(tmp_path), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=inherited,
    )
    children: list[int] = []
    try:
        wait_for("the MLflow UI to answer", lambda: proc.poll() is not None or answers(port), 90)
        assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-2000:]
        children = descendants_of(proc.pid)
        assert children
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=20) == 0
        assert not answers(port)
        wait_for("the server's processes to end", lambda: not any(alive(pid) for pid in children), 10)
    finally:
        for pid in [proc.pid, *children]:  # whatever the command failed to stop is the test's to clean up
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        log.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
