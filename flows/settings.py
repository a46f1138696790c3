"""The environment the commands give Prefect, MLflow and the libraries they load.

Prefect and MLflow keep their state (Prefect's home and result store, the MLflow store) inside the
run's working folder, send no telemetry, and stay quiet on the console unless asked: the CLI prints
its own progress, summary and one-line errors. Nothing here imports Prefect: it reads its settings
when it is first imported, so they must be in the environment before that.
"""

from __future__ import annotations

import os
from pathlib import Path

SERVER_STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
SERVER_STARTUP_SECONDS = "120"
"""How long a run waits for Prefect's local server to answer. Prefect's own default, 20 s, is
exceeded on a busy 2-core machine, where the server's start alone can take that long."""


def prefect_environment(workdir: str | Path, verbose: bool = False) -> dict[str, str]:
    """Prefect's home, result storage and telemetry settings, all inside the working folder.

    Unless ``verbose``, Prefect's and MLflow's run logs are off: the CLI prints its own progress,
    summary and one-line errors, which those logs would only repeat with tracebacks.
    """
    home = Path(workdir).resolve() / "prefect"
    (home / "results").mkdir(parents=True, exist_ok=True)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO" if verbose else "CRITICAL",
        "MLFLOW_LOGGING_LEVEL": "INFO" if verbose else "WARNING",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        SERVER_STARTUP_SETTING: os.environ.get(SERVER_STARTUP_SETTING, SERVER_STARTUP_SECONDS),
    }


QUIET_LIBRARIES = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""For processes whose output lands on a console that should show errors only (the flow runs that
``watch`` serves): no library warnings, no weight-loading or download progress bars."""
