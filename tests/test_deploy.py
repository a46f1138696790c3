"""Work pools: ``trace-realign deploy``, ``run --pool`` and ``watch --pool`` against a real
``prefect server start`` and a real ``prefect worker start`` of a process-type pool on 127.0.0.1.

One server and one worker serve the whole module (started once, stopped in teardown, each in its
own process group). The runs stop after the triage stage (``--until triage``: loading, judging
from the smoke pairs' annotations and triage), which keeps each run to seconds while exercising
the stage cache and the working folder's artifacts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_watch import clean_env, edit, policy_copy, running_prefect_server, wait_for
from trace_realign.flows.watch import stop_process_group

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
POOL = "trace-pool-test"
CLI_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def area(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pool")


@pytest.fixture(scope="module")
def server(area):
    """A real ``prefect server start`` on a free 127.0.0.1 port; its API URL."""
    with running_prefect_server(area) as api_url:
        yield api_url


def sets(area: Path, model: Path, policy: Path, name: str = "pool-test") -> list[str]:
    pairs = [
        f"run.workdir={area / 'work'}", f"run.name={name}", f"model.path={model}",
        f"data.path={REPO / 'data' / 'smoke' / 'pairs.jsonl'}", f"policy.path={policy}",
    ]
    return [x for s in pairs for x in ("--set", s)]


def cli(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``trace-realign ...`` in a process of its own (the submitter), from ``cwd``, no PREFECT_* inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "trace_realign.flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S,
    )


class Api:
    """Read-only questions to the server through the Prefect client."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def __enter__(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings(updates={PREFECT_API_URL: self.api_url})
        self._settings.__enter__()
        self._client = get_client(sync_client=True)
        return self._client.__enter__()

    def __exit__(self, *exc):
        self._client.__exit__(*exc)
        self._settings.__exit__(*exc)


@pytest.fixture(scope="module")
def deployed(area, server, tiny_model_dir):
    """``trace-realign deploy`` run once, before any worker exists: it creates the pool."""
    policy = policy_copy(area)
    out = cli("deploy", "--config", str(SMOKE), *sets(area, tiny_model_dir, policy), "--pool", POOL, "--server", server, "--until", "triage", cwd=area)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"policy": policy, "stdout": out.stdout}


@pytest.fixture(scope="module")
def worker(area, server, deployed):
    """A real ``prefect worker start --pool POOL`` (process type); yields its Popen and log path."""
    home = area / "worker-home"
    home.mkdir()
    env = {**clean_env(home), "PREFECT_API_URL": server, "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = area / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        def polling():
            with Api(server) as client:
                return proc.poll() is not None or any(w.name == "test-worker" for w in client.read_workers_for_work_pool(POOL))

        wait_for("the worker to poll the pool", polling, 60)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield proc, log_path
    finally:
        stop_process_group(proc)


def test_deploy_creates_a_process_pool_and_registers_the_flow(area, server, deployed):
    assert f"deployed realign/pool-test to work pool {POOL} (process)" in deployed["stdout"]
    assert f"prefect worker start --pool {POOL}" in deployed["stdout"]
    with Api(server) as client:
        pool = client.read_work_pool(POOL)
        dep = client.read_deployment_by_name("realign/pool-test")
    assert pool.type == "process"
    assert dep.work_pool_name == POOL and dep.entrypoint == "trace_realign.flows.realign.realign"
    # The working folder travels absolute: a worker's flow run starts in a folder of its own.
    assert dep.parameters["config"]["run"]["workdir"] == str(area / "work") and dep.parameters["until"] == "triage"
    env = dep.job_variables["env"]
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(area / "work" / "prefect" / "results")
    assert "PREFECT_HOME" not in env and not any(re.search(r"(KEY|TOKEN|PASSWORD|SECRET)$", k) for k in env)


def submitted_run_id(stdout: str) -> str:
    match = re.search(r"submitted flow run ([0-9a-f-]{36}) of realign/pool-test to work pool", stdout)
    assert match, stdout
    return match.group(1)


def test_a_run_submitted_from_the_cli_is_run_by_the_worker_and_a_second_is_cached(area, server, deployed, worker, tiny_model_dir):
    proc, worker_log = worker
    elsewhere = area / "submitter"  # the submitter's folder: nothing of the run may land there
    elsewhere.mkdir()
    args = ("run", "--config", str(SMOKE), *sets(area, tiny_model_dir, deployed["policy"]), "--until", "triage", "--pool", POOL, "--server", server, "--wait")
    first = cli(*args, cwd=elsewhere)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    run_id = submitted_run_id(first.stdout)
    assert f"{server[:-4]}/runs/flow-run/{run_id}" in first.stdout
    pickup = re.search(r"picked up by a worker: pending after ([\d.]+) s, running after ([\d.]+) s", first.stdout)
    assert pickup, first.stdout
    with Api(server) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed() and run.work_pool_name == POOL
    # Executed by the worker: the run's process is the one the worker started, not the submitter.
    manifest_path = Path(re.search(r"manifest: (\S+)", first.stdout).group(1))
    manifest = json.loads(manifest_path.read_text())
    assert manifest_path.parent.parent == area / "work" / "runs"
    from mlflow import MlflowClient

    tags = MlflowClient(f"sqlite:///{area / 'work' / 'mlflow.db'}").get_run(manifest["run_id"]).data.tags
    assert run.infrastructure_pid and tags["trace.pid"] == str(run.infrastructure_pid)
    assert run_id in worker_log.read_text()
    assert not any(elsewhere.iterdir())
    # Its artifacts are in the configured working folder, and every stage ran.
    stages = manifest["stages"]
    assert {"load", "triage"} <= set(stages) and not any(info["cached"] for info in stages.values())
    for info in stages.values():
        for artifact in info["artifacts"].values():
            for entry in artifact if isinstance(artifact, list) else [artifact]:
                if isinstance(entry, dict) and "path" in entry:
                    assert Path(entry["path"]).is_file() and (area / "work") in Path(entry["path"]).parents

    second = cli(*args, cwd=elsewhere)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(Path(re.search(r"manifest: (\S+)", second.stdout).group(1)).read_text())
    assert again["run_id"] != manifest["run_id"] and set(again["stages"]) == set(stages)
    assert all(info["cached"] for info in again["stages"].values()), again["stages"]
    print(f"worker pick-up: pending after {pickup.group(1)} s, running after {pickup.group(2)} s (worker polls every 1 s)")


def test_the_policy_watcher_submits_to_the_pool(area, server, deployed, worker, tiny_model_dir):
    driver = textwrap.dedent(
        f"""
        import sys
        from trace_realign.flows.cli import main
        sys.exit(main(["watch", "--config", {str(SMOKE)!r}, *{sets(area, tiny_model_dir, deployed['policy'])!r},
                       "--interval", "2", "--server", {server!r}, "--pool", {POOL!r}, "--until", "load"]))
        """
    )
    log_path = area / "watch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", driver], cwd=area, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("a watcher tick", lambda: proc.poll() is not None or "serving policy-watcher/pool-test" in log_path.read_text(), 90)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        with Api(server) as client:
            known = {r.id for r in client.read_flow_runs()}
        time.sleep(3)  # a tick has recorded the start-up hash
        edit(deployed["policy"])

        def new_run():
            with Api(server) as client:
                return [r for r in client.read_flow_runs() if r.id not in known and r.name.startswith("policy-")]

        run = wait_for("a realign run started by the watcher", new_run, 60)[0]

        def finished():
            with Api(server) as client:
                r = client.read_flow_run(run.id)
            return r if r.state.is_final() else None

        done = wait_for("the worker to finish the watcher's run", finished, 90)
        assert done.state.is_completed() and done.work_pool_name == POOL and done.infrastructure_pid
        assert done.parameters["until"] == "load"
        assert str(run.id) in worker[1].read_text()
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-2000:]
        assert f"started realign run {run.id}" in log_path.read_text()
    finally:
        stop_process_group(proc)


def test_a_pool_needs_a_server_one_line(area, tiny_model_dir):
    out = cli("run", "--config", str(SMOKE), *sets(area, tiny_model_dir, REPO / "configs" / "policies" / "smoke-new.md"), "--pool", POOL, cwd=area)
    assert out.returncode == 2
    assert out.stderr.strip() == "trace-realign: error: --pool needs a running Prefect server: give --server URL or set PREFECT_API_URL"


def test_a_pool_type_no_worker_here_can_create_is_one_line(area, server, tiny_model_dir):
    out = cli(
        "deploy", "--config", str(SMOKE), *sets(area, tiny_model_dir, REPO / "configs" / "policies" / "smoke-new.md", "k8s-test"),
        "--pool", "k8s-test", "--pool-type", "kubernetes", "--server", server, cwd=area,
    )
    assert out.returncode == 2 and "\n" not in out.stderr.strip(), out.stderr
    assert "--pool-type kubernetes: no Prefect worker of that type is installed here" in out.stderr


def test_submitting_without_a_deployment_is_one_line(area, server, tiny_model_dir):
    out = cli(
        "run", "--config", str(SMOKE), *sets(area, tiny_model_dir, REPO / "configs" / "policies" / "smoke-new.md", "never-deployed"),
        "--pool", POOL, "--server", server, cwd=area,
    )
    assert out.returncode == 2 and "\n" not in out.stderr.strip(), out.stderr
    assert f"--pool {POOL}: no deployment realign/never-deployed on {server}; register it first: trace-realign deploy" in out.stderr
