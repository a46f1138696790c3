"""Names built from user input that reach MLflow and Prefect: valid, or mapped with the original
recorded, and checked before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name, _validate_model_name

from trace_realign.tasks import tracking
from trace_realign.tasks.tracking import metric_key, registered_model_name
from tests.test_pipeline import ROOT, assert_one_line_error, cli, judge, make_config, run_flow, write_config  # noqa: F401
from trace_realign.core.errors import ConfigError


@pytest.mark.parametrize(
    "key, expected",
    [
        ("tpa_before/educational", "tpa_before/educational"),  # valid keys are kept as they are
        ("tpa_before/ethics and law", "tpa_before/ethics and law"),
        ("tpa_before/Wh@t?", "tpa_before/Wh_t_-a00fa095"),
        ("tpa_before/a//b", "tpa_before/a/b-92960322"),
        ("tpa_before/../x", "tpa_before/x-c13c8499"),
        ("tpa_before/", "tpa_before-876c131c"),
        ("tpa_before/ethics & law", "tpa_before/ethics _ law-f3df7e7d"),
    ],
)
def test_metric_keys_from_data_become_valid_keys(key, expected):
    assert metric_key(key) == expected
    _validate_metric_name(metric_key(key))  # MLflow's own check accepts it


def test_distinct_invalid_keys_stay_distinct_and_long_keys_are_cut():
    assert metric_key("tpa/a?b") != metric_key("tpa/a!b")  # both clean to tpa/a_b; the hash keeps them apart
    long = "x" * 400
    assert len(metric_key(long)) == 250
    _validate_metric_name(metric_key(long))


@pytest.mark.parametrize(
    "run_name, expected",
    [("smoke", "smoke-realigned"), ("team/smoke", "team-smoke-realigned"), ("a:b/c", "a-b-c-realigned"), ("..", "realigned")],
)
def test_the_default_registered_name_is_mapped_and_the_original_kept(run_name, expected):
    name, original = registered_model_name(run_name, None)
    assert name == expected
    _validate_model_name(name)
    assert original == (None if expected == f"{run_name}-realigned" else f"{run_name}-realigned")


@pytest.mark.parametrize("bad", ["team/model", "a:b", "../up", ""])
def test_an_explicit_registered_name_mlflow_refuses_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="mlflow.registered_model_name"):
        registered_model_name("smoke", bad)


def test_register_model_swallows_only_already_exists(tmp_path):
    c = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run = c.create_run(exp)
    model_id = c.create_logged_model(exp, source_run_id=run.info.run_id).model_id
    assert tracking.register_model(c, "ok-name", model_id, run.info.run_id, {}) == 1
    assert tracking.register_model(c, "ok-name", model_id, run.info.run_id, {}) == 2  # exists already: fine
    # A local store does not list the versions on the logged model (a server does): register_model does.
    listed = json.loads(c.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in listed] == [("ok-name", "1"), ("ok-name", "2")]

    class Refusing:
        def __getattr__(self, name):
            return getattr(c, name)

        def create_registered_model(self, name):
            raise MlflowException("the registry is read-only", error_code="PERMISSION_DENIED")

    with pytest.raises(MlflowException, match="read-only"):
        tracking.register_model(Refusing(), "other", model_id, run.info.run_id, {})


def test_a_run_name_with_a_slash_runs_and_registers_a_mapped_name(tmp_path, judge):
    from mlflow import MlflowClient

    cfg = make_config(tmp_path, judge.url, run={"name": "team/smoke"})
    manifest = run_flow(cfg, until="train")
    assert manifest["status"] == "FINISHED" and manifest["registered_model_name"] == "team-smoke-realigned"
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg['run']['workdir']).resolve() / 'mlflow.db'}")
    assert client.search_model_versions("name='team-smoke-realigned'")
    parent = client.get_run(manifest["run_id"])
    assert parent.data.tags["mlflow.runName"] == "team/smoke"
    assert parent.data.tags["trace.registered_model_name_requested"] == "team/smoke-realigned"


def test_evaluation_groups_reach_mlflow_under_valid_keys_with_the_originals_recorded(tmp_path, judge):
    from mlflow import MlflowClient

    prompts = tmp_path / "prompts.jsonl"
    groups = ["ethics & law", "a//b", "what?"]
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: tell me about topic {i}.", "group": g}) + "\n" for i, g in enumerate(groups)))
    cfg = make_config(tmp_path, judge.url, evaluation={"enabled": True, "prompts_path": str(prompts), "max_new_tokens": 4})
    manifest = run_flow(cfg)
    stage = manifest["stages"]["evaluate"]
    assert {f"tpa_before/{g}" for g in groups} <= set(stage["metrics"])  # the manifest keeps the originals
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg['run']['workdir']).resolve() / 'mlflow.db'}")
    run = client.get_run(stage["mlflow_run_id"])
    renamed = json.loads(run.data.tags["trace.renamed_metrics"])
    for g in groups:
        key = metric_key(f"tpa_before/{g}")
        assert key in run.data.metrics and renamed[key] == f"tpa_before/{g}"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("mlflow.registered_model_name=team/model", "mlflow.registered_model_name 'team/model'"),
        ("mlflow.experiment=" + "x" * 600, "mlflow.experiment: longer than MLflow's 500 characters"),
    ],
)
def test_bad_names_fail_before_any_stage_runs(tmp_path, override, needle):
    cfg = make_config(tmp_path, "http://127.0.0.1:9/v1")
    proc = cli(["run", "--config", str(write_config(tmp_path, cfg)), "--set", override, "--no-progress"], tmp_path)
    assert_one_line_error(proc, needle)
    assert not (Path(cfg["run"]["workdir"]) / "artifacts").exists()  # nothing ran


def test_deployment_names_drop_the_characters_prefect_refuses():
    from trace_realign.flows.watch import deployment_name

    assert deployment_name("smoke") == "smoke"
    assert deployment_name("team/smoke") == "team-smoke"
    assert deployment_name("a%b&c>d<e") == "a-b-c-d-e"
