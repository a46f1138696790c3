import os
import random
import tempfile

import pytest

# Prefect and MLflow state of the test session stays in a temporary folder, never the home folder.
_STATE = tempfile.mkdtemp(prefix="trace-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_STATE, "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_STATE, "prefect", "results")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.makedirs(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"], exist_ok=True)

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def shared_prefect_server():
    """One real ``prefect server start`` for the session's command-line runs (``PREFECT_API_URL`` in
    the environment they inherit), as ``trace-realign server start`` gives a user: without it every
    CLI run in a test starts Prefect's temporary server (7 to 10 s each, measured). Tests of the
    temporary server itself, or of runs without any server, remove ``PREFECT_API_URL`` from the
    child's environment. In-process flows keep the ephemeral server Prefect chose at import."""
    from pathlib import Path

    from trace_realign.flows.server import free_port, launch_server, server_log_path, stop_process_group, wait_healthy

    home = Path(_STATE, "shared-server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    proc = launch_server(home, port)
    try:
        wait_healthy(proc, api_url, server_log_path(home))  # the product's own bound (SERVER_START_TIMEOUT_S)
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop_process_group(proc)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from trace_realign.core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    from trace_realign.core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-tied", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from trace_realign.core.modeling import load_tokenizer

    return load_tokenizer(tiny_model_dir)


WORDS = "the a model policy refuse help answer safe harm trolley money bank water civil law".split()


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))
