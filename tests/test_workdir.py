"""One run at a time per working folder, and runs that died are closed in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trace_realign.flows.workdir import WorkdirBusy, read_holder, workdir_lock
from tests.oracle_fakes import FakeJudgeProcess
from tests.test_pipeline import CLI_TIMEOUT_S, ROOT, assert_one_line_error, cli, kill_run_after, make_config, write_config


def hold_lock(workdir: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process holding the folder's lock (as a running ``trace-realign run`` does)."""
    code = textwrap.dedent(
        f"""
        import time
        from trace_realign.flows.workdir import workdir_lock
        with workdir_lock({str(workdir)!r}, "trace-realign run 'other'"):
            print("held", flush=True)
            time.sleep({seconds})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    holder = hold_lock(tmp_path / "work")
    try:
        with pytest.raises(WorkdirBusy) as err:
            with workdir_lock(tmp_path / "work", "test"):
                pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "trace-realign run 'other'" in message and "started 20" in message
        assert read_holder(tmp_path / "work")["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock with the killed holder: the folder is free again.
    with workdir_lock(tmp_path / "work", "test") as folder:
        assert read_holder(folder)["pid"] == os.getpid()


def test_the_lock_is_reentrant_and_waits_when_asked(tmp_path):
    with workdir_lock(tmp_path, "outer"), workdir_lock(tmp_path, "inner"):
        assert read_holder(tmp_path)["command"] == "outer"
    holder = hold_lock(tmp_path, seconds=2)
    told = []
    t0 = time.monotonic()
    with workdir_lock(tmp_path, "waiting", wait_s=None, on_wait=told.append):
        waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.5 and len(told) == 1 and told[0].startswith("waiting: another run (pid")


@pytest.mark.parametrize("before", ["", '{"pid": 999999999, "started": "2026-01-01T00:00:00+00:00"}'])
def test_a_holder_that_has_not_written_its_details_yet_is_named_once_it_has(tmp_path, before):
    """The window between a holder's flock and its details: the file is empty (a new folder) or holds
    the last holder's details (a process that is gone). The refused process looks again."""
    (tmp_path / "workdir.lock").write_text(before, encoding="utf-8")
    code = textwrap.dedent(
        f"""
        import fcntl, json, os, time
        handle = open({str(tmp_path / "workdir.lock")!r}, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("locked", flush=True)
        time.sleep(0.5)
        handle.seek(0); handle.truncate()
        handle.write(json.dumps({{"pid": os.getpid(), "started": "now", "command": "late writer"}})); handle.flush()
        time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy) as err:
            with workdir_lock(tmp_path, "test"):
                pass
        assert f"another run (pid {holder.pid}, started now, late writer)" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_run_on_a_busy_workdir_is_one_line_naming_the_other_run(tmp_path):
    cfg = make_config(tmp_path, "http://127.0.0.1:9/v1")
    holder = hold_lock(Path(cfg["run"]["workdir"]))
    try:
        proc = cli(["run", "--config", str(write_config(tmp_path, cfg)), "--until", "load", "--no-progress"], tmp_path)
        assert_one_line_error(proc, f"another run (pid {holder.pid}, started ")
        assert not (Path(cfg["run"]["workdir"]) / "artifacts").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_runs_started_together_on_a_new_workdir(tmp_path):
    """Both start at once: one runs, the other stops with one line (or, if the first was already done,
    runs from its cache); never a traceback from a half-set-up MLflow or Prefect database."""
    with FakeJudgeProcess(latency=0.2) as server:
        cfg = make_config(tmp_path, server.url)
        cfg["oracle"]["max_concurrency"] = 1
        config = write_config(tmp_path, cfg)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "trace_realign.flows.cli", "run", "--config", str(config), "--until", "judge", "--no-progress"]
        procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=CLI_TIMEOUT_S) for p in procs]
        codes = sorted(p.returncode for p in procs)
        for _, err in outs:
            assert "Traceback" not in err, err[-3000:]
        assert codes in ([0, 0], [0, 2]), (codes, [e[-500:] for _, e in outs])
        if codes == [0, 2]:
            busy = [e for (_, e), p in zip(outs, procs) if p.returncode == 2][0]
            # One line, naming the other run by pid even when it was refused in the instant between
            # the other's taking the lock and writing its details.
            assert [l for l in busy.splitlines() if l.strip()] == [l for l in busy.splitlines() if "another run (pid" in l]
        # 24 pairs, two responses each: no question was asked twice.
        assert server.stats()["requests"] == 48


def test_a_killed_run_is_closed_by_the_next_one(tmp_path):
    """SIGKILL leaves the parent run and the running stage RUNNING; the next run in the folder marks
    them KILLED with the reason."""
    from mlflow import MlflowClient

    with FakeJudgeProcess(latency=0.25) as server:
        cfg = make_config(tmp_path, server.url)
        cfg["oracle"]["max_concurrency"] = 1
        config = write_config(tmp_path, cfg)
        kill_run_after(config, tmp_path, server, 4)
        client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg['run']['workdir']).resolve() / 'mlflow.db'}")
        exp = client.get_experiment_by_name("trace-realign")
        running = [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
        assert {r.data.tags.get("stage", "parent") for r in running} == {"parent", "judge-0000"}
        done = cli(["run", "--config", str(config), "--until", "judge", "--no-progress"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads(Path(done.stdout.split("manifest:")[1].split()[0]).read_text())
    assert sorted(manifest["closed_dead_runs"]) == sorted(r.info.run_id for r in running)
    for r in running:
        after = client.get_run(r.info.run_id)
        assert after.info.status == "KILLED"
        assert after.data.tags["trace.killed_reason"].startswith(f"process {r.data.tags['trace.pid']} ended without finishing")
