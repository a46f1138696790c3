"""`vllm serve` (vLLM's OpenAI-compatible server, from .venv-vllm, on 127.0.0.1) behind the openai
judge: the whole smoke DAG (configs/smoke.yaml from the CLI in this venv) judged by it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.vllm_venv import ROOT, vllm_env, vllm_python

SERVER_START_TIMEOUT_S = 600
"""Bound on the server's start (the engine load: about 45 s on 2 idle cores); a hang still fails."""
RUN_TIMEOUT_S = 600
"""Bound on the smoke run (26 to 54 s with the annotations oracle; here about 100 judge requests more)."""
MODEL_NAME = "smollm2-judge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on the prepared SmolLM2 folder: its base URL.
    Started in its own process group and killed with it (engine core included), pass or fail."""
    from trace_realign.core.assets import prepare_model

    python = vllm_python()
    model = prepare_model("smollm2-135m-instruct")
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm-serve") / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        ],
        cwd=log.name.rsplit("/", 1)[0], env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s: {Path(log.name).read_text()[-3000:]}")
            time.sleep(2)
        yield f"{base}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_the_smoke_dag_judged_by_vllm_serve(vllm_server, tmp_path):
    """The oracle (72 verdicts), the evaluation's judge and its win rate all ask the served model; every
    verdict is known (choice-constrained) and carries a log-prob confidence."""
    work = tmp_path / "smoke"
    sets = {
        "run.workdir": str(work), "oracle.backend": "openai", "oracle.model": MODEL_NAME,
        "oracle.base_url": vllm_server, "oracle.api_key_env": "null", "oracle.use_structured_output": "true",
        "oracle.max_concurrency": "4",
    }  # fmt: skip
    args = ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--no-progress"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(
        [sys.executable, "-m", "trace_realign.flows.cli", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    assert manifest["status"] == "FINISHED"
    verdicts = [
        row
        for name, stage in manifest["stages"].items() if name.startswith("judge-")
        for row in pq.read_table(stage["artifacts"]["verdicts"]["path"]).to_pylist()
    ]  # fmt: skip
    assert len(verdicts) == 36
    for row in verdicts:
        for side in ("chosen", "rejected"):
            assert row[f"{side}_raw"] in ("Yes", "No") and row[f"{side}_compliant"] is not None
            assert 0.5 <= row[f"{side}_confidence"] <= 1.0
            assert row["judge"].startswith(f"openai:{MODEL_NAME}")
    evaluation = manifest["stages"]["evaluate"]
    metrics = evaluation["metrics"]
    # 2 generations a held-out prompt, identical (prompt, response) pairs asked once through the verdict cache
    assert 0 < metrics["judge_requests"] <= 2 * metrics["n"] and metrics["n_unknown_before"] == metrics["n_unknown_after"] == 0
    assert {"tpa_before", "tpa_after", "win_rate"} <= set(metrics) and metrics["win_n_unknown"] == 0
    rows = pq.read_table(evaluation["artifacts"]["generations"]["path"]).to_pylist()
    assert len(rows) == metrics["n"] > 0 and all(r["realigned_confidence"] is not None for r in rows)
