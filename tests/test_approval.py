"""The approval gate against a real Prefect server: an edit under ``watch --approval`` starts a run
that pauses after triage with the policy diff as its artifact, and an approval sent through
Prefect's API resumes it to the end; ``run --approval`` rejected with ``trace-realign approve
--reject`` ends with nothing trained, and one left without a decision expires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trace_realign.core.policy import load_policy
from trace_realign.flows import watch
from trace_realign.flows.approval import artifact_key, pending_path
from tests.test_pipeline import CLI_TIMEOUT_S, NO_SERVER, ROOT, cli
from tests.test_watch import STOP_BOUND_S, Server, clean_env, running_prefect_server, stop_watch, wait_for

SMOKE = ROOT / "configs" / "smoke.yaml"
OLD = ROOT / "configs" / "policies" / "smoke-old.md"
NEW = ROOT / "configs" / "policies" / "smoke-new.md"


def prefect(api_url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api_url})


def flow_run(api_url: str, flow_run_id: str):
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with prefect(api_url), get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id))


def approval_artifact(api_url: str, key: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect(api_url), get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0].data if found else None


def smoke_sets(tmp_path: Path, model: Path, policy: Path) -> list[str]:
    return [
        f"run.workdir={tmp_path / 'work'}", "run.name=gate-test", f"model.path={model}",
        f"data.path={ROOT / 'data' / 'smoke' / 'pairs.jsonl'}", f"policy.path={policy}",
        "approval.poll_s=1", "evaluation.enabled=false",
    ]


@pytest.mark.slow
def test_an_edit_pauses_for_approval_and_an_approval_through_the_api_trains(tmp_path, tiny_model_dir):
    policy = tmp_path / "policy.md"
    policy.write_text(OLD.read_text())
    with running_prefect_server(tmp_path) as api_url:
        driver = textwrap.dedent(
            f"""
            import argparse, sys
            from trace_realign.flows.watch import cmd_watch
            args = argparse.Namespace(config={str(SMOKE)!r}, set={smoke_sets(tmp_path, tiny_model_dir, policy)!r}, preset=[],
                                      interval=2.0, cron=None, server={api_url!r}, until="train", approval=True)
            sys.exit(cmd_watch(args))
            """
        )
        log = tmp_path / "watch.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        proc = subprocess.Popen(
            [sys.executable, "-c", driver], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        server = Server(api_url)
        try:
            wait_for("a completed watcher tick", lambda: proc.poll() is not None or server.runs("policy-watcher/gate-test", "COMPLETED"), 90)
            assert proc.poll() is None, log.read_text()[-3000:]
            policy.write_text(NEW.read_text())  # the edit
            os.utime(policy, (time.time() - 5, time.time() - 5))  # settled
            paused = wait_for("the realign run to pause", lambda: server.runs("realign/gate-test", "PAUSED"), 150)[0]
            # The person sees the diff against the version the edit replaced.
            report = approval_artifact(api_url, artifact_key("gate-test"))
            assert report and "smoke-old v1" in report and "| **retain** | 12 | 12 | 12 | 0 | 36 |" in report
            waiting = json.loads(pending_path(tmp_path / "work").read_text())
            assert waiting["flow_run_id"] == str(paused.id) and waiting["api_url"] == api_url
            assert not (tmp_path / "work" / "artifacts" / "train").exists()
            # Approve through Prefect's API, as the UI's Resume form does.
            from prefect.flow_runs import resume_flow_run

            with prefect(api_url):
                resume_flow_run(paused.id, run_input={"approve": True, "note": "checked the diff"})
            done = wait_for("the realign run to finish", lambda: server.runs("realign/gate-test", "COMPLETED"), 180)[0]
            assert done.id == paused.id and not pending_path(tmp_path / "work").exists()
            last = json.loads((tmp_path / "work" / "runs" / "last.json").read_text())
            manifest = json.loads(Path(last["manifest"]).read_text())
            assert manifest["status"] == "FINISHED" and "train" in manifest["stages"]
            assert manifest["approval"] == {"approved": True, "note": "checked the diff"}
            assert manifest["previous_policy"]["sha256"] == load_policy(OLD).sha256
            assert stop_watch(proc, log) == 0
        finally:
            watch.stop_process_group(proc)


@pytest.mark.slow
def test_run_with_approval_is_rejected_or_expires_with_nothing_trained(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    sets = [x for s in smoke_sets(tmp_path, tiny_model_dir, NEW) for x in ("--set", s)]
    args = ["run", "--config", str(SMOKE), *sets, "--approval", "--no-progress"]
    # Without a server a person can reach, the gate is refused before anything runs.
    home = tmp_path / "home"
    no_server = cli(args, tmp_path, env={**NO_SERVER, "TRACE_REALIGN_HOME": str(home)})
    assert no_server.returncode == 2 and "trace-realign server start" in no_server.stderr
    assert not (tmp_path / "work" / "artifacts").exists()
    with running_prefect_server(tmp_path) as api_url:
        env = {**clean_env(tmp_path / "server-home"), "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "trace_realign.flows.cli", *args], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            waiting = wait_for("the run to wait for approval", lambda: proc.poll() is not None or pending_path(tmp_path / "work").is_file(), 150)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert waiting is True
            record = json.loads(pending_path(tmp_path / "work").read_text())
            # No previous policy: the gate shows the triage report.
            assert "| invert | 12 |" in approval_artifact(api_url, artifact_key("gate-test"))
            decided = cli(["approve", "--workdir", str(tmp_path / "work"), "--reject", "--note", "not this quarter"], tmp_path, env=env)
            assert decided.returncode == 0 and decided.stdout.startswith(f"rejected flow run {record['flow_run_id']}"), decided.stderr
            out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 3, err[-3000:]
        assert [l for l in err.splitlines() if l.strip()] == [
            "trace-realign: rejected: rejected at the approval gate (not this quarter): nothing was trained"
        ]
        state = flow_run(api_url, record["flow_run_id"]).state
        assert state.type.value == "CANCELLED" and state.name == "Rejected"
        assert not (tmp_path / "work" / "artifacts" / "train").exists() and not pending_path(tmp_path / "work").exists()
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
        parent = client.get_run(record["mlflow_run_id"])
        assert parent.info.status == "KILLED" and parent.data.tags["approval"].startswith("rejected: rejected at the approval gate")
        # No decision at all: the gate expires after approval.timeout_s.
        expiring = cli([*args, "--set", "approval.timeout_s=2"], tmp_path, env=env)
        assert expiring.returncode == 3, expiring.stderr[-3000:]
        assert [l for l in expiring.stderr.splitlines() if l.strip()] == [
            "trace-realign: expired: no decision within 2 s at the approval gate: nothing was trained"
        ]
        expired = json.loads(Path(json.loads((tmp_path / "work" / "runs" / "last.json").read_text())["manifest"]).read_text())
        assert expired["status"] == "EXPIRED" and "train" not in expired["stages"]
        expired_state = flow_run(api_url, expired["flow_run_id"]).state
        assert expired_state.type.value == "FAILED", expired_state  # as Prefect ends an expired pause
        # Nothing waits any more: approve says so in one line.
        late = cli(["approve", "--workdir", str(tmp_path / "work")], tmp_path, env=env)
        assert late.returncode == 2 and late.stderr.startswith("trace-realign: error: ") and "no run is waiting" in late.stderr
