"""``trace-realign watch``: the policy watcher's tick logic, and the whole command on real servers.

The tick tests need no Prefect. The slow tests start real ``prefect server start`` processes on
127.0.0.1 (in their own process groups, stopped in teardown) and run ``watch`` in a subprocess
with ``until="load"``, so a realign run it starts finishes in seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from trace_realign.flows import watch
from trace_realign.flows.watch import api_url_of, check_policy, healthy, record_baseline, stop_process_group, ui_url_of

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "configs" / "policies" / "smoke-new.md"


def policy_copy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.md"
    path.write_text(POLICY.read_text(encoding="utf-8"), encoding="utf-8")
    settle(path)
    return path


def settle(path: Path) -> None:
    """Date the file back past the watcher's settle time, as if the editor finished a while ago."""
    past = time.time() - 10 * watch.SETTLE_SECONDS
    os.utime(path, (past, past))


def edit(path: Path, sentence: str = "Cite a source for every factual claim.") -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n{sentence}\n", encoding="utf-8")
    settle(path)


class Trigger:
    """A stand-in for ``run_deployment``: records each start and returns a run id."""

    def __init__(self, fail_times: int = 0, on_call=None):
        self.calls: list[tuple[str, str]] = []
        self.fail_times = fail_times
        self.on_call = on_call

    def __call__(self, key: str, sha: str) -> str:
        if self.on_call:
            self.on_call(key, sha)
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("server went away")
        self.calls.append((key, sha))
        return f"run-{len(self.calls)}"


# --- one tick --------------------------------------------------------------------------------------


def test_first_check_records_and_an_edit_starts_exactly_one_run(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "work" / "watch" / "policy_state.json"
    trigger = Trigger()
    assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "recorded"
    assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "unchanged"
    assert trigger.calls == []
    edit(policy)
    out = check_policy(state, policy, trigger, log=lambda _: None)
    assert out["status"] == "triggered" and out["flow_run_id"] == "run-1"
    for _ in range(2):  # later ticks see the same new hash: no second run
        assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "unchanged"
    assert len(trigger.calls) == 1
    stored = watch.read_state(state)
    assert stored["sha256"] == trigger.calls[0][1] and stored["changes"] == 1 and stored["pending"] is None
    assert stored["last_run_id"] == "run-1"


def test_new_hash_is_stored_before_the_run_is_requested(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    record_baseline(state, policy)
    edit(policy)

    def stored_first(key, sha):
        stored = watch.read_state(state)
        assert stored["sha256"] == sha and stored["pending"]["key"] == key

    trigger = Trigger(on_call=stored_first)
    assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "triggered"
    assert len(trigger.calls) == 1


def test_a_failed_start_is_retried_with_the_same_key(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    record_baseline(state, policy)
    edit(policy)
    seen: list[str] = []
    trigger = Trigger(fail_times=1, on_call=lambda key, sha: seen.append(key))
    with pytest.raises(ConnectionError):
        check_policy(state, policy, trigger, log=lambda _: None)
    assert watch.read_state(state)["pending"]["key"] == seen[0]
    # The retry reuses the key, so a server that did create the run answers with that run.
    assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "unchanged"
    assert seen == [seen[0], seen[0]] and len(trigger.calls) == 1
    assert watch.read_state(state)["pending"] is None


def test_each_change_gets_a_fresh_key_even_back_to_an_earlier_policy(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    original = policy.read_text(encoding="utf-8")
    record_baseline(state, policy)
    trigger = Trigger()
    edit(policy)
    check_policy(state, policy, trigger, log=lambda _: None)
    policy.write_text(original, encoding="utf-8")  # reverted: a change too, with its own run
    settle(policy)
    assert check_policy(state, policy, trigger, log=lambda _: None)["status"] == "triggered"
    assert len({key for key, _ in trigger.calls}) == 2


def test_overlapping_ticks_start_one_run(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    record_baseline(state, policy)
    edit(policy)
    trigger = Trigger(on_call=lambda key, sha: time.sleep(0.3))  # a slow request widens the race
    results: list[str] = []
    ticks = [threading.Thread(target=lambda: results.append(check_policy(state, policy, trigger, log=lambda _: None)["status"])) for _ in range(4)]
    for t in ticks:
        t.start()
    for t in ticks:
        t.join()
    assert sorted(results) == ["triggered", "unchanged", "unchanged", "unchanged"]
    assert len(trigger.calls) == 1


def test_restart_keeps_the_stored_hash(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    first = record_baseline(state, policy)
    assert record_baseline(state, policy) == first  # a restart: nothing to trigger
    assert check_policy(state, policy, Trigger(), log=lambda _: None)["status"] == "unchanged"
    edit(policy)  # edited while watch was stopped: the next watch's first tick realigns
    assert record_baseline(state, policy)["sha256"] == first["sha256"]
    assert check_policy(state, policy, Trigger(), log=lambda _: None)["status"] == "triggered"


def test_line_endings_alone_are_no_change(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    record_baseline(state, policy)
    policy.write_bytes(policy.read_bytes().replace(b"\n", b"\r\n"))
    settle(policy)
    assert check_policy(state, policy, Trigger(), log=lambda _: None)["status"] == "unchanged"


def test_a_broken_or_half_written_policy_starts_nothing(tmp_path):
    policy, state = policy_copy(tmp_path), tmp_path / "policy_state.json"
    good = policy.read_text(encoding="utf-8")
    record_baseline(state, policy)
    trigger, lines = Trigger(), []
    policy.write_text("", encoding="utf-8")
    settle(policy)
    assert check_policy(state, policy, trigger, log=lines.append)["status"] == "invalid"
    assert len(lines) == 1 and str(policy) in lines[0]
    policy.write_text(good + "\nJust written.\n", encoding="utf-8")  # mtime now: the editor may be mid-write
    assert check_policy(state, policy, trigger, log=lines.append)["status"] == "settling"
    policy.write_text(good, encoding="utf-8")  # fixed back to the last good version: no change
    settle(policy)
    assert check_policy(state, policy, trigger, log=lines.append)["status"] == "unchanged"
    assert trigger.calls == []


# --- server addresses and errors -------------------------------------------------------------------


def test_server_urls():
    assert api_url_of("http://127.0.0.1:4200") == "http://127.0.0.1:4200/api"
    assert api_url_of("http://127.0.0.1:4200/api/") == "http://127.0.0.1:4200/api"
    assert ui_url_of("http://127.0.0.1:4200/api") == "http://127.0.0.1:4200"
    with pytest.raises(watch.ConfigError, match="--server 'localhost:4200'"):
        api_url_of("localhost:4200")


def smoke_args(tmp_path: Path, policy: Path, model: Path | str = "tiny-random") -> list[str]:
    return [
        f"run.workdir={tmp_path / 'work'}", "run.name=watch-test", f"model.path={model}",
        f"data.path={REPO / 'data' / 'smoke' / 'pairs.jsonl'}", f"policy.path={policy}",
    ]


def test_unreachable_server_is_one_line_naming_the_url(tmp_path, capsys):
    from trace_realign.flows.cli import main

    url = f"http://127.0.0.1:{watch.free_port()}/api"
    sets = [x for s in smoke_args(tmp_path, policy_copy(tmp_path)) for x in ("--set", s)]
    code = main(["watch", "--config", str(REPO / "configs" / "smoke.yaml"), *sets, "--server", url])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and url in err and "Traceback" not in err


def test_bad_interval_is_one_line(tmp_path, capsys):
    from trace_realign.flows.cli import main

    sets = [x for s in smoke_args(tmp_path, policy_copy(tmp_path)) for x in ("--set", s)]
    assert main(["watch", "--config", str(REPO / "configs" / "smoke.yaml"), *sets, "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err


def test_bad_cron_is_one_line_before_anything_starts(tmp_path, capsys):
    from trace_realign.flows.cli import main

    sets = [x for s in smoke_args(tmp_path, policy_copy(tmp_path)) for x in ("--set", s)]
    assert main(["watch", "--config", str(REPO / "configs" / "smoke.yaml"), *sets, "--cron", "every day"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "trace-realign: error: --cron 'every day': not a valid cron expression (minute hour day month weekday)"
    assert not (tmp_path / "work" / "watch" / "server.log").exists()


# --- against real servers --------------------------------------------------------------------------


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    return env


@contextlib.contextmanager
def running_prefect_server(folder: Path):
    """A real ``prefect server start`` on a free 127.0.0.1 port with its home and log in ``folder``;
    yields its API URL, stops its process group on exit."""
    port = watch.free_port()
    home = folder / "server-home"
    home.mkdir()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for("the Prefect server to be healthy", lambda: proc.poll() is not None or healthy(api_url), 90)
        assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
        yield api_url
    finally:
        stop_process_group(proc)
        log.close()


@pytest.fixture
def prefect_server(tmp_path):
    """A real ``prefect server start`` on a free 127.0.0.1 port with its home in tmp_path."""
    with running_prefect_server(tmp_path) as api_url:
        yield api_url


def start_watch(tmp_path: Path, policy: Path, model: Path, server: str | None, interval: float) -> subprocess.Popen:
    """``cmd_watch`` in its own process (with ``until="load"``, which the CLI does not offer)."""
    driver = textwrap.dedent(
        f"""
        import argparse, sys
        from trace_realign.flows.watch import cmd_watch
        args = argparse.Namespace(config={str(REPO / 'configs' / 'smoke.yaml')!r}, set={smoke_args(tmp_path, policy, model)!r}, preset=[],
                                  interval={interval!r}, cron=None, server={server!r}, until="load")
        sys.exit(cmd_watch(args))
        """
    )
    out = open(tmp_path / "watch.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# watch's own bound: noting the runs in flight, the serving process's grace, stopping its server.
STOP_BOUND_S = watch.BEFORE_STOP_S + watch.STOP_GRACE_S + watch.SERVER_STOP_TIMEOUT_S + 5


def stop_watch(proc: subprocess.Popen, log: Path, sig: int = signal.SIGINT) -> int:
    """Ctrl-C (SIGINT to watch only, as a terminal would with the server in its own group), or SIGTERM."""
    os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"watch did not stop within {STOP_BOUND_S:.0f} s of signal {sig}:\n" + log.read_text()[-2000:])


class Server:
    """Read-only questions to the Prefect server through the Prefect client."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def runs(self, deployment: str, state: str | None = None) -> list:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            try:
                dep = client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                return []
            run_filter = None
            if state:
                run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(state)])))
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])), flow_run_filter=run_filter)


@pytest.mark.slow
def test_editing_the_policy_starts_exactly_one_realign_run(tmp_path, prefect_server, tiny_model_dir):
    policy = policy_copy(tmp_path)
    server = Server(prefect_server)
    started = time.monotonic()
    proc = start_watch(tmp_path, policy, tiny_model_dir, prefect_server, interval=2.0)
    log = tmp_path / "watch.log"
    try:
        # Ready: the watcher has finished a tick (which found the start-up hash unchanged).
        wait_for("a completed watcher tick", lambda: proc.poll() is not None or server.runs("policy-watcher/watch-test", "COMPLETED"), 75)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert f"connected to the Prefect server at {prefect_server}" in log.read_text()
        assert server.runs("realign/watch-test") == []
        edited = time.monotonic()
        edit(policy)
        run = wait_for("a realign run", lambda: server.runs("realign/watch-test"), 60)[0]
        created_after = time.monotonic() - edited
        assert run.parameters["until"] == "load" and run.name.startswith("policy-")
        wait_for("the realign run to finish", lambda: server.runs("realign/watch-test", "COMPLETED"), 60)
        # Later ticks see the same (new) hash and start nothing.
        ticks = len(server.runs("policy-watcher/watch-test", "COMPLETED"))
        wait_for("two more watcher ticks", lambda: len(server.runs("policy-watcher/watch-test", "COMPLETED")) >= ticks + 2, 60)
        runs = server.runs("realign/watch-test")
        assert [r.id for r in runs] == [run.id]
        state = watch.read_state(watch.state_path_for(tmp_path / "work"))
        assert state["changes"] == 1 and state["pending"] is None and state["last_run_id"] == str(run.id)
        assert stop_watch(proc, log) == 0
        text = log.read_text()
        assert f"started realign run {run.id}" in text and "watch stopped" in text
        print(f"realign run created {created_after:.1f} s after the edit; whole test {time.monotonic() - started:.1f} s")
    finally:
        stop_process_group(proc)


def server_processes(port: int) -> list[int]:
    """Processes whose command line is a Prefect server on ``port`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and any(b"prefect" in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_watch_starts_its_own_server_and_stops_it_on_ctrl_c(tmp_path, tiny_model_dir, sig):
    policy = policy_copy(tmp_path)
    proc = start_watch(tmp_path, policy, tiny_model_dir, None, interval=60.0)
    log = tmp_path / "watch.log"
    port = None
    try:
        line = wait_for(
            "watch to start its server",
            lambda: proc.poll() is not None or next((x for x in log.read_text().splitlines() if x.startswith("serving ")), None),
            90,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        assert "started a Prefect server at http://127.0.0.1:" in text and "UI: http://127.0.0.1:" in text, line
        api_url = text.split("started a Prefect server at ", 1)[1].split(";", 1)[0]
        port = int(api_url.rsplit(":", 1)[1].split("/", 1)[0])
        assert healthy(api_url) and server_processes(port)
        assert (tmp_path / "work" / "prefect" / "server.db").is_file()  # its home is in the workdir
        assert stop_watch(proc, log, sig) == 0
        assert not healthy(api_url, timeout=1.0)
        wait_for("the server's processes to end", lambda: not server_processes(port), 10)
    finally:
        stop_process_group(proc)
        # Should watch have failed to stop it, the server is this test's to clean up.
        for pid in server_processes(port) if port else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_model_dir):
    policy = policy_copy(tmp_path)
    proc = start_watch(tmp_path, policy, tiny_model_dir, None, interval=1.0)
    log = tmp_path / "watch.log"
    try:
        wait_for("watch to serve", lambda: proc.poll() is not None or "serving " in log.read_text(), 90)
        assert proc.poll() is None, log.read_text()[-3000:]
        api_url = log.read_text().split("started a Prefect server at ", 1)[1].split(";", 1)[0]
        port = int(api_url.rsplit(":", 1)[1].split("/", 1)[0])
        time.sleep(1.5)  # a tick is starting
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        stopped_at = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=15)
        assert code == 130 and time.monotonic() - stopped_at < 10, log.read_text()[-2000:]
        # Nothing it started is left: the server, the serving process and its flow runs are killed.
        wait_for("the server's processes to end", lambda: not server_processes(port), 10)
        assert not descendants_of(proc.pid)
        assert "Traceback" not in log.read_text()
    finally:
        stop_process_group(proc)


def descendants_of(pid: int) -> list[int]:
    """Live processes whose parent chain leads to ``pid`` (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        out.extend(frontier)
    return out


def _set_state(api_url: str, run_id, state) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


@pytest.mark.slow
def test_an_interrupted_watch_never_wedges_the_next_one(tmp_path, prefect_server, tiny_model_dir):
    """Item: a watch stopped while a tick (or a realign run) was in flight left runs in "Submitting"
    that held the deployments' one-at-a-time slots, so after a restart every tick was cancelled and
    an edit made while watch was down was never realigned. Here the stale runs are made as a killed
    watch leaves them (a tick and a realign run pending on the server), and watch restarted."""
    from prefect.states import Pending, Running

    policy = policy_copy(tmp_path)
    server = Server(prefect_server)
    proc = start_watch(tmp_path, policy, tiny_model_dir, prefect_server, interval=2.0)
    log = tmp_path / "watch.log"
    try:
        wait_for("a completed watcher tick", lambda: proc.poll() is not None or server.runs("policy-watcher/watch-test", "COMPLETED"), 75)
        edit(policy)
        first = wait_for("a realign run", lambda: server.runs("realign/watch-test"), 60)[0]
        wait_for("the realign run to finish", lambda: server.runs("realign/watch-test", "COMPLETED"), 60)
        os.kill(proc.pid, signal.SIGKILL)  # killed outright: nothing cleans up
        proc.wait()
        wait_for("the serving process to follow its parent", lambda: not descendants_of(proc.pid) and not serving_processes(tmp_path), 20)
        # What the dead watch "left": a tick stuck pending, and a realign run cut short while running.
        tick = server.runs("policy-watcher/watch-test")[0]
        _set_state(prefect_server, tick.id, Pending(name="Submitting"))
        _set_state(prefect_server, first.id, Running())
        legacy_limits(prefect_server)  # as the earlier watch set them
        edit(policy, "Prefer primary sources.")  # edited while watch is down
        cancelled_before = len(server.runs("policy-watcher/watch-test", "CANCELLED"))
        completed_before = len(server.runs("policy-watcher/watch-test", "COMPLETED"))

        proc = start_watch(tmp_path, policy, tiny_model_dir, prefect_server, interval=2.0)
        wait_for("two more completed ticks", lambda: len(server.runs("policy-watcher/watch-test", "COMPLETED")) >= completed_before + 2, 90)
        wait_for("the resumed run and the new edit's run to finish",
                 lambda: len(server.runs("realign/watch-test", "COMPLETED")) >= 2, 120)
        assert len(server.runs("policy-watcher/watch-test", "CANCELLED")) == cancelled_before  # no tick refused a slot
        assert legacy_limits(prefect_server, read_only=True) == [None, None]
        assert {r.state.name for r in server.runs("policy-watcher/watch-test") if r.id == tick.id} == {"Crashed"}
        realigns = server.runs("realign/watch-test")
        assert [r.state.name for r in realigns if r.id == first.id] == ["Crashed"]
        resumed = [r for r in realigns if r.name == f"{first.name}-resumed"]
        assert len(resumed) == 1 and resumed[0].state.name == "Completed"
        # The edit made while watch was down: realigned exactly once.
        state = watch.read_state(watch.state_path_for(tmp_path / "work"))
        assert state["changes"] == 2 and state["pending"] is None
        after_edit = [r for r in realigns if str(r.id) == state["last_run_id"]]
        assert len(after_edit) == 1 and after_edit[0].state.name == "Completed"
        assert len(realigns) == 3, [(r.name, r.state.name) for r in realigns]
        assert stop_watch(proc, log) == 0
        text = log.read_text()
        assert "Traceback" not in text and "Warning" not in text, text[-3000:]
    finally:
        stop_process_group(proc)


def serving_processes(tmp_path: Path) -> list[int]:
    """Processes serving this test's deployments (the command line names its serve.json)."""
    spec = str(tmp_path / "work" / "watch" / "serve.json").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if spec in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def legacy_limits(api_url: str, read_only: bool = False) -> list:
    """The deployments' concurrency limits; unless ``read_only``, first set them to 1, as the earlier
    watch did (a slot a dead run could hold for minutes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name in ("realign/watch-test", "policy-watcher/watch-test"):
            dep = client.read_deployment_by_name(name)
            if not read_only:
                client.update_deployment(dep.id, DeploymentUpdate(concurrency_limit=1))
                dep = client.read_deployment_by_name(name)
                assert dep.global_concurrency_limit is not None
            out.append(dep.global_concurrency_limit)
    return out
