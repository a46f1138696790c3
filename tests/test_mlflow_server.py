"""The smoke DAG tracked on a real ``mlflow server --serve-artifacts`` on 127.0.0.1: runs, plots and
the registered model arrive through the server (the client never touches the server's folders), the
registered model loads with ``mlflow.pyfunc.load_model`` and generates, and what the MLflow UI reads
(through the same REST API) shows a model-training experiment, the data set, the registered model
and a description holding the before/after table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, cli
from tests.test_ui import answers
from tests.test_watch import wait_for
from trace_realign.flows.watch import free_port, stop_process_group
from trace_realign.tasks import tracking

SERVER_START_TIMEOUT_S = 90  # about 6 s on idle cores
LOAD_TIMEOUT_S = 180  # a fresh process: MLflow, torch and the tiny model (about 15 s on idle cores)


@dataclass
class Server:
    url: str
    root: Path  # the server's store and artifact folder; nothing on the client side names it

    def rest(self, endpoint: str, **query) -> dict:
        """GET ``/api/2.0/mlflow/<endpoint>``: the REST API the UI reads."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "wb") as log:  # a file, not a pipe nobody reads
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for("the MLflow server to answer", lambda: proc.poll() is not None or answers(port), SERVER_START_TIMEOUT_S)
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            yield Server(f"http://127.0.0.1:{port}", root)
        finally:
            stop_process_group(proc)


@dataclass
class Smoke:
    manifest: dict
    client_dir: Path
    work: Path
    stdout: str


@pytest.fixture(scope="module")
def smoke(server, tmp_path_factory) -> Smoke:
    """configs/smoke.yaml run from the CLI in a folder of its own, tracked on the server."""
    client_dir = tmp_path_factory.mktemp("client")
    work = client_dir / "work"
    proc = cli(
        ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run.workdir={work}",
         "--set", f"mlflow.tracking_uri={server.url}", "--no-progress"],
        client_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    assert manifest["status"] == "FINISHED"
    return Smoke(manifest, client_dir, work, proc.stdout)


def test_runs_plots_and_model_arrive_through_the_server_and_the_client_writes_no_store(smoke, server):
    c = tracking.client(server.url)
    exp = c.get_experiment_by_name("trace-realign")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's proxied store, no client path
    runs = c.search_runs([exp.experiment_id])
    parent = c.get_run(smoke.manifest["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith("mlflow-artifacts:")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"load", "triage", "reference", "train", "evaluate"} <= set(children)
    assert children["train"].data.metrics["global_step"] == 6
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/triage_counts.png", "plots/impact_weights.png"} <= plots
    # The client sent every file to the server, which wrote it under its own folder.
    stored = {p.name for p in (server.root / "artifacts").rglob("*") if p.is_file()}
    assert {"manifest.json", "triage_counts.png", "training_curves.png", "MLmodel", "adapter_model.safetensors"} <= stored
    # ... and the client kept no MLflow store of its own: no database, no mlruns, no artifact folder.
    leftovers = [p for p in smoke.client_dir.rglob("*") if p.name in ("mlruns", "mlartifacts", "mlflow.db")]
    assert not leftovers
    assert json.loads((smoke.work / "runs" / "last.json").read_text())["tracking_uri"] == server.url


def test_the_ui_sees_a_training_experiment_its_data_set_registered_model_and_description(smoke, server):
    """Read through the REST endpoints the MLflow UI calls."""
    exp = server.rest("experiments/get-by-name", experiment_name="trace-realign")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI view
    run = server.rest("runs/get", run_id=smoke.manifest["run_id"])["run"]
    (dataset,) = [d["dataset"] for d in run["inputs"]["dataset_inputs"]]
    assert dataset["name"] == "preference_pairs" and dataset["digest"] == smoke.manifest["data"]["sha256"][:36]
    (output,) = run["outputs"]["model_outputs"]
    model = server.rest(f"logged-models/{output['model_id']}")["model"]
    train_run = smoke.manifest["stages"]["train"]
    assert model["info"]["source_run_id"] == train_run["mlflow_run_id"] and model["info"]["status"] == "LOGGED_MODEL_READY"
    model_tags = {t["key"]: t["value"] for t in model["info"]["tags"]}
    versions = json.loads(model_tags["mlflow.modelVersions"])  # what the UI lists as the run's registered models
    assert [(v["name"], str(v["version"])) for v in versions] == [("smoke-realigned", "1")]
    version = server.rest("model-versions/get", name="smoke-realigned", version="1")["model_version"]
    assert version["source"] == f"models:/{output['model_id']}" and version["run_id"] == train_run["mlflow_run_id"]
    # The description: the before/after table of the evaluate stage, its numbers as the manifest has them.
    note = {t["key"]: t["value"] for t in run["data"]["tags"]}[tracking.DESCRIPTION_TAG]
    metrics = smoke.manifest["stages"]["evaluate"]["metrics"]
    assert "| metric | before | after |" in note and "models:/smoke-realigned/1" in note
    assert f"| tpa | {metrics['tpa_before']:.3f} | {metrics['tpa_after']:.3f} |" in note
    # The run's summary links to the run in the UI's model-training view (3.17 opens GenAI otherwise).
    link = f"{server.url}/#/experiments/{exp['experiment_id']}/runs/{smoke.manifest['run_id']}?workflowType=machine_learning"
    assert f"browse runs: {link}" in smoke.stdout and "View run" not in smoke.stdout  # not MLflow's GenAI-view links


LOAD_AND_GENERATE = """
import json, sys
import mlflow.pyfunc
model = mlflow.pyfunc.load_model("models:/smoke-realigned/1")
print(json.dumps(model.predict(json.loads(sys.argv[1]))))
"""


def test_the_registered_model_loads_from_the_server_and_generates_as_the_realigned_adapter(smoke, server, tmp_path):
    from trace_realign.core.assets import resolve_model
    from trace_realign.core.evaluation.generation import generate
    from trace_realign.core.modeling import load_realigned, load_tokenizer

    prompts = ["How do I open a bank account?", "Tell me about the water cycle."]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, json.dumps(prompts)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    # The same greedy generations as the adapter the train stage wrote, on the base model.
    adapter = smoke.manifest["stages"]["train"]["artifacts"]["adapter"]["path"]
    model, _ = load_realigned(resolve_model("tiny-random"), adapter=adapter)
    expected = generate(model, load_tokenizer(adapter), prompts, max_new_tokens=128)
    assert loaded == expected and all(loaded)
    assert not list(tmp_path.rglob("mlruns"))


def test_a_local_store_marks_the_experiment_as_training_and_keeps_a_kind_already_set(tmp_path):
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = tracking.experiment_id(c, "fresh", tmp_path)
    assert c.get_experiment(made).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert c.get_experiment(made).artifact_location == (tmp_path / "mlruns").as_uri()
    older = c.create_experiment("older", artifact_location=(tmp_path / "a").as_uri())  # made before the tag existed
    assert tracking.experiment_id(c, "older", tmp_path) == older
    assert c.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = c.create_experiment("chosen", artifact_location=(tmp_path / "b").as_uri(), tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.experiment_id(c, "chosen", tmp_path)
    assert c.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_trace_realign_ui_prints_the_last_runs_page_in_the_training_view(tmp_path):
    from trace_realign.flows.cli import _last_run_link

    uri = tracking.tracking_uri(tmp_path, None)
    c = tracking.client(uri)
    experiment = tracking.experiment_id(c, "trace-realign", tmp_path)
    run_id = c.create_run(experiment).info.run_id
    server = "http://127.0.0.1:5000"
    assert _last_run_link(str(tmp_path), uri, server) == server  # no run yet
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    assert _last_run_link(str(tmp_path), uri, server) == f"{server}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    assert _last_run_link(str(tmp_path), "http://elsewhere:5000", server) == server  # the run is in another store
    (tmp_path / "runs" / "last.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": uri}))
    assert _last_run_link(str(tmp_path), uri, server) == server  # a run purged since (mlflow gc)
