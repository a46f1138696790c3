"""`trace-realign server start|stop|status`: a Prefect server kept running that `run` uses instead
of a temporary one, and a cached rerun that loads none of the libraries its stages would need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.test_pipeline import CLI_TIMEOUT_S, ROOT, cli
from trace_realign.flows.server import SERVER_START_TIMEOUT_S, healthy

HEAVY = ("torch", "transformers", "peft", "mlflow.pyfunc", "matplotlib")

RUN_AND_REPORT = """
import json, sys
from trace_realign.flows.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stages_of(workdir: Path) -> dict:
    last = json.loads((workdir / "runs" / "last.json").read_text())
    return json.loads(Path(last["manifest"]).read_text())["stages"]


def test_a_started_server_serves_runs_and_a_cached_rerun_loads_no_heavy_library(tmp_path, monkeypatch):
    env = {"TRACE_REALIGN_HOME": str(tmp_path / "home")}
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the session's shared server (conftest) is not this one
    start = cli(["server", "start"], tmp_path, env, timeout=SERVER_START_TIMEOUT_S + 30)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        ui = start.stdout.split("Prefect server started: ", 1)[1].split()[0]
        api_url = ui + "/api"
        assert healthy(api_url)
        state = json.loads((tmp_path / "home" / "prefect-server" / "prefect" / "server.json").read_text())
        assert state["api_url"] == api_url
        again = cli(["server", "start"], tmp_path, env, timeout=60)
        assert again.returncode == 0 and f"already running: {ui}" in again.stdout

        workdir = tmp_path / "work"
        run = ["run", "--config", "smoke", "--no-progress", "--set", f"run.workdir={workdir}"]
        first = cli(run, tmp_path, env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert [r["name"] for r in flow_runs(api_url)], "the run did not reach the started server"
        assert not (workdir / "prefect" / "prefect.db").exists()  # no temporary server's database

        rerun = subprocess.run(
            [sys.executable, "-c", RUN_AND_REPORT, *run], cwd=tmp_path, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        report = json.loads(rerun.stdout.strip().splitlines()[-1])
        assert report == {"rc": 0, "heavy": []}
        stages = stages_of(workdir)
        assert stages and all(info["cached"] for info in stages.values())
        assert len(flow_runs(api_url)) == 2

        status = cli(["server", "status"], tmp_path, env, timeout=60)
        assert status.returncode == 0 and ui in status.stdout
    finally:
        stop = cli(["server", "stop"], tmp_path, env, timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not healthy(api_url)
    status = cli(["server", "status"], tmp_path, env, timeout=60)
    assert status.returncode == 1 and "no Prefect server running" in status.stdout
    assert cli(["server", "stop"], tmp_path, env, timeout=60).stdout.strip() == "no Prefect server was running"
