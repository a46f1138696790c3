"""PostgreSQL behind the Prefect server and the MLflow tracking server, as docker/compose.yaml runs them.

A real PostgreSQL from Debian's packages (initdb into a temporary folder, TCP on a free
127.0.0.1 port, its unix socket beside its data) is initialised as the compose file's `postgres`
service initialises the official image: the user and password of the env file, the `prefect`
database, then docker/postgres's init scripts (MLflow's database). `prefect server start` and
`mlflow server` then run with the commands and environment read from compose.yaml, resolved with
.env.example's values; only hosts, ports and paths are substituted (the `postgres` host becomes
127.0.0.1 and PostgreSQL's port, listen addresses 127.0.0.1, free ports, the artifact folder a
temporary one). The compose health checks, with the same substitutions, decide when each service
is up. Then a flow run goes through the Prefect server and an MLflow run with a metric and an
artifact through the MLflow server, and psql finds them, and both servers' tables, in PostgreSQL.

No Docker engine is involved (none runs on the build machines); PostgreSQL here is Debian 12's 15,
the compose file's image is 17. CI installs Debian's `postgresql` package where it is missing
(.ci/run).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.test_docker import DOCKER, DOCKERFILES, ROOT, argv, compose_tree, env_example, resolved, venv_tool
from tests.test_watch import wait_for
from trace_realign.flows.watch import free_port, stop_process_group

PG_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")
# Each bound covers a start on a loaded 2-core machine; the compose file allows the servers
# start_period + retries * interval (150 s) to become healthy.
PG_TIMEOUT_S = 60
SERVER_HEALTHY_S = 150
CLIENT_TIMEOUT_S = 120
PREFECT_TABLES = {"alembic_version", "flow", "flow_run", "task_run", "deployment", "work_pool", "log"}
MLFLOW_TABLES = {"alembic_version", "experiments", "runs", "metrics", "params", "tags", "registered_models", "model_versions"}


def postgres_bindir(path: str | None = None, lib: Path = Path("/usr/lib/postgresql")) -> Path:
    """The folder holding PostgreSQL's server programs: where `pg_ctl` on ``path`` (default: PATH)
    points, else the newest ``lib``/<major>/bin (Debian keeps them off PATH). Fails the test
    naming what is missing and how to install it."""
    candidates = []
    if shutil.which("pg_ctl", path=path):
        candidates.append(Path(shutil.which("pg_ctl", path=path)).resolve().parent)
    candidates += sorted(lib.glob("*/bin"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), reverse=True)
    for folder in candidates:
        if all((folder / name).exists() for name in PG_PROGRAMS):
            return folder
    pytest.fail(
        f"PostgreSQL's programs ({', '.join(PG_PROGRAMS)}) are not installed (looked on PATH and in "
        f"{lib}/*/bin): install Debian's postgresql package (apt-get install -y postgresql; .ci/run does)"
    )


def as_postgres_user() -> dict:
    """Popen arguments that run PostgreSQL as the `postgres` system user when the tests run as root
    (initdb and postgres refuse root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, and there is no `postgres` system user to run PostgreSQL as (Debian's postgresql package creates it)")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres:
    """A PostgreSQL cluster of the test's own, set up as compose.yaml's `postgres` service is."""

    def __init__(self, bindir: Path, root: Path, user: str, password: str):
        self.bindir, self.root, self.user, self.password = bindir, root, user, password
        self.data, self.socket_dir, self.log = root / "data", root / "socket", root / "postgres.log"
        self.port = free_port()
        self.run_as = as_postgres_user()

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "LC_ALL": "C.UTF-8", "HOME": str(self.root), **extra}

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(self.bindir / cmd[0]), *cmd[1:]], env=env or self.env(), cwd=self.root,
            capture_output=True, text=True, timeout=PG_TIMEOUT_S, **self.run_as,
        )
        if check and out.returncode != 0:
            pytest.fail(f"{' '.join(cmd[:2])} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
        return out

    def start(self, database: str, init_scripts: list[Path]) -> None:
        """The official image's first start: initdb with the user and password, host connections
        by password (scram-sha-256), create ``database``, run the init scripts in it."""
        self.socket_dir.mkdir()
        if self.run_as:
            for path in (self.root, self.socket_dir):
                os.chown(path, self.run_as["user"], self.run_as["group"])
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            os.chown(pwfile, self.run_as["user"], self.run_as["group"])
        pwfile.chmod(0o600)
        self.run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.socket_dir}"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", str(PG_TIMEOUT_S), "start")
        local = self.env(PGHOST=str(self.socket_dir), PGPORT=str(self.port), PGUSER=self.user)
        self.run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", f'CREATE DATABASE "{database}"', env=local)
        for script in init_scripts:
            self.run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", database, "-f", str(script), env=local)

    def stop(self) -> None:
        """Stop the server (and every backend) without a shutdown checkpoint: the cluster is deleted next."""
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", str(PG_TIMEOUT_S), "stop", check=False)

    def psql(self, database: str, sql: str, password: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """``sql`` run by psql over TCP as the compose user with ``password`` (default: its own),
        as the servers connect; unaligned, tab-separated, no header."""
        env = self.env(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=self.user, PGPASSWORD=password or self.password, PGDATABASE=database)
        return self.run("psql", "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql, env=env, check=check)

    def query(self, database: str, sql: str) -> list[tuple[str, ...]]:
        """The rows ``sql`` returns, as tuples of strings."""
        return [tuple(line.split("\t")) for line in self.psql(database, sql).stdout.splitlines() if line]

    def tables(self, database: str) -> set[str]:
        return {row[0] for row in self.query(database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def healthcheck(service: dict, replace: dict[str, str]) -> tuple[list[str], bool]:
    """The service's compose health check as an argv (``CMD``) or a shell line (``CMD-SHELL``),
    with ``replace``'s substitutions; ``$$`` is the container shell's ``$``."""
    kind, *test = service["healthcheck"]["test"]
    test = [substituted(resolved(t), replace) for t in test]
    return (test, False) if kind == "CMD" else (test[0], True)


def substituted(text: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def with_flags(args: list[str], values: dict[str, str]) -> list[str]:
    """``args`` with the value after each flag in ``values`` replaced (the flag must be there)."""
    out = list(args)
    for flag, value in values.items():
        assert flag in out, f"compose.yaml: {flag} missing from {args}"
        out[out.index(flag) + 1] = value
    return out


def is_healthy(check: tuple, env: dict[str, str]) -> bool:
    test, shell = check
    try:
        return subprocess.run(test, shell=shell, env=env, capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_service(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The service's entrypoint and command (its program from this environment), in its own
    process group so that it and its workers stop together."""
    exe = venv_tool(args[0])
    assert exe, f"{args[0]} is not installed: run scripts/setup.sh"
    with open(log, "wb") as out:
        return subprocess.Popen(
            [exe, *args[1:]], env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL, then the compose file's prefect-server and mlflow-server against it, healthy.

    Yields a dict: ``pg`` (Postgres), ``prefect_api`` and ``mlflow_uri`` (URLs on 127.0.0.1),
    ``artifacts`` (the MLflow server's artifact folder), ``logs`` (name -> log file) and
    ``values`` (the env file's values used). Everything is stopped and removed afterwards, also
    when start-up fails."""
    bindir = postgres_bindir()
    tmp = tmp_path_factory.mktemp("pg-stack")
    services = compose_tree()["services"]
    # .env.example's values with a fresh password (letters and digits, as it asks) and free ports
    values = {**env_example(), "POSTGRES_PASSWORD": secrets.token_hex(16), "PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    postgres_env = resolved(services["postgres"]["environment"], values)
    init = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in services["postgres"]["volumes"]}
    init_scripts = [src for dst, src in sorted(init.items()) if dst.startswith("/docker-entrypoint-initdb.d/")]

    # pytest's base temporary folder is private to root: the `postgres` user could not enter it,
    # so the cluster lives in a folder of its own (short, for the unix socket's path limit)
    pg_root = Path(tempfile.mkdtemp(prefix="trace-pg-"))
    pg = Postgres(bindir, pg_root, postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"])
    procs, logs = {}, {"postgres": pg.log}
    try:
        pg.start(postgres_env["POSTGRES_DB"], init_scripts)
        pg_check = healthcheck(services["postgres"], {})
        assert is_healthy(pg_check, pg.env(**postgres_env, PGHOST=str(pg.socket_dir), PGPORT=str(pg.port))), "compose's pg_isready check fails"

        ports = {"prefect-server": int(values["PREFECT_PORT"]), "mlflow-server": int(values["MLFLOW_PORT"])}
        replace = {"@postgres:5432/": f"@127.0.0.1:{pg.port}/"}
        artifacts = tmp / "mlartifacts"
        flags = {
            "prefect-server": {"--host": "127.0.0.1", "--port": values["PREFECT_PORT"]},
            "mlflow-server": {"--host": "127.0.0.1", "--port": values["MLFLOW_PORT"], "--artifacts-destination": str(artifacts)},
        }
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        checks = {}
        for name in ("prefect-server", "mlflow-server"):
            service = services[name]
            internal = re.search(r":(\d+)$", service["ports"][0]).group(1)  # the container's port
            home = tmp / f"{name}-home"
            home.mkdir()
            env = {**base, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect")}
            env.update({k: substituted(v, replace) for k, v in resolved(service["environment"], values).items()})
            args = with_flags([substituted(a, replace) for a in argv(service, values)], flags[name])
            logs[name] = tmp / f"{name}.log"
            procs[name] = start_service(args, env, logs[name])
            checks[name] = healthcheck(service, {f"127.0.0.1:{internal}/": f"127.0.0.1:{ports[name]}/"})
        for name, proc in procs.items():
            wait_for(
                f"{name} to pass its compose health check", lambda: proc.poll() is not None or is_healthy(checks[name], base), SERVER_HEALTHY_S, every=1.0
            )
            assert proc.poll() is None, f"{name} exited (code {proc.returncode}):\n" + logs[name].read_text()[-3000:]
        yield {
            "pg": pg, "values": values, "logs": logs, "artifacts": artifacts,
            "prefect_api": f"http://127.0.0.1:{values['PREFECT_PORT']}/api", "mlflow_uri": f"http://127.0.0.1:{values['MLFLOW_PORT']}",
        }
    finally:
        for proc in procs.values():
            stop_process_group(proc)
        pg.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.mark.slow
def test_prefect_flow_run_is_recorded_in_postgres(stack, tmp_path):
    """A flow with a task, run by a separate client process against the server, lands in the
    `prefect` database as a completed flow run with its completed task run."""
    script = textwrap.dedent(
        """
        import json
        from prefect import flow, task

        @task
        def double(x: int) -> int:
            return 2 * x

        @flow(name="postgres-check")
        def check(x: int) -> int:
            return double(x)

        state = check(21, return_state=True)
        print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "result": state.result()}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=stack["prefect_api"], PREFECT_HOME=str(tmp_path / "client-home"), PREFECT_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert reported["result"] == 42

    pg = stack["pg"]
    rows = pg.query("prefect", f"SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE r.id = '{reported['flow_run_id']}'")
    assert rows == [("postgres-check", "COMPLETED")]
    tasks = pg.query("prefect", f"SELECT task_key, state_type FROM task_run WHERE flow_run_id = '{reported['flow_run_id']}'")
    assert [state for _, state in tasks] == ["COMPLETED"] and tasks[0][0].startswith("double-")


@pytest.mark.slow
def test_mlflow_run_metric_and_artifact_go_through_the_server_into_postgres(stack, tmp_path):
    """An MLflow run with a metric and an artifact, logged over HTTP only: the metric is a row in
    the `mlflow` database, the artifact is proxied into the server's artifact folder (the client
    never sees that folder) and downloads back unchanged."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow_uri"])
    experiment_id = client.create_experiment("postgres-check")
    run = client.create_run(experiment_id, run_name="postgres-check")
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 0.25, step=3)
    note = tmp_path / "note.txt"
    note.write_text("logged through the MLflow server\n")
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert client.get_run(run_id).data.metrics == {"loss": 0.25}
    assert [f.path for f in client.list_artifacts(run_id)] == ["note.txt"]
    back = Path(client.download_artifacts(run_id, "note.txt", str(tmp_path / "back")))
    assert back.read_text() == note.read_text()
    assert [p.read_text() for p in stack["artifacts"].rglob("note.txt")] == [note.read_text()]

    pg = stack["pg"]
    assert pg.query("mlflow", f"SELECT key, value, step FROM metrics WHERE run_uuid = '{run_id}'") == [("loss", "0.25", "3")]
    assert pg.query("mlflow", f"SELECT name, status FROM runs WHERE run_uuid = '{run_id}'") == [("postgres-check", "FINISHED")]


@pytest.mark.slow
def test_both_servers_created_their_tables_in_their_own_databases(stack):
    pg = stack["pg"]
    prefect_tables, mlflow_tables = pg.tables("prefect"), pg.tables("mlflow")
    assert PREFECT_TABLES <= prefect_tables, PREFECT_TABLES - prefect_tables
    assert MLFLOW_TABLES <= mlflow_tables, MLFLOW_TABLES - mlflow_tables
    assert not {"flow_run", "task_run"} & mlflow_tables and not {"runs", "metrics"} & prefect_tables


@pytest.mark.slow
def test_postgres_takes_only_the_password_over_tcp(stack):
    """Host connections authenticate by password (as the image's scram-sha-256), so the servers
    got in with the URL's credentials, not by trust."""
    wrong = stack["pg"].psql("prefect", "SELECT 1", password="not-" + stack["values"]["POSTGRES_PASSWORD"], check=False)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


@pytest.mark.slow
def test_no_server_log_holds_the_database_password(stack):
    password = stack["values"]["POSTGRES_PASSWORD"]
    for name, log in stack["logs"].items():
        assert password not in log.read_text(errors="replace"), f"{name}'s log holds the database password"


def test_the_mlflow_driver_is_pinned_as_the_image_pins_it():
    """The dev extra installs the PostgreSQL driver the image's MLflow server uses, at the same
    version (Prefect's asyncpg comes with Prefect in both)."""
    import tomllib

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    image_pin = re.search(r'"(psycopg2-binary==[\d.]+)"', DOCKERFILES["cpu"].read_text()).group(1)
    assert image_pin in dev


def test_missing_postgres_fails_naming_the_package(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"initdb, pg_ctl, postgres, psql, pg_isready\) are not installed .*apt-get install -y postgresql"):
        postgres_bindir(path=str(tmp_path), lib=tmp_path)
    found = postgres_bindir()
    assert all(os.access(found / name, os.X_OK) for name in PG_PROGRAMS)
