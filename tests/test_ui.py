"""``trace-realign ui``: the MLflow server it starts stops with it, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows.watch import free_port
from tests.test_pipeline import ROOT
from tests.test_watch import descendants_of, wait_for


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_the_mlflow_server_stops_with_the_ui_command(tmp_path, sig):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--workdir", str(tmp_path), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for("the MLflow UI to answer", lambda: proc.poll() is not None or answers(port), 90)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        children = descendants_of(proc.pid)
        assert children
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=20) == 0
        assert not answers(port)
        wait_for("the server's processes to end", lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
