"""Benchmarks through lm-evaluation-harness: the shipped task runs offline on the tiny model and its
accuracy is the brute-force one; the evaluate stage logs each metric before and after with the
harness's results; an unknown task is one line; the shipped task files key the evaluate stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trace_realign.core.config import SHIPPED_LM_EVAL_TASKS, EvaluationConfig, LmEvalConfig, LoraConfig, input_files
from trace_realign.core.errors import ConfigError
from trace_realign.core.evaluation.benchmarks import metric_name, plan_benchmarks, run_benchmarks, shipped_tasks
from trace_realign.core.modeling import add_lora, load_model

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 10


def questions() -> list[dict]:
    path = SHIPPED_LM_EVAL_TASKS / "trace_mini_mc.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def brute_force_acc(model, tokenizer, docs: list[dict]) -> float:
    """The share of ``docs`` whose gold choice has the highest log-likelihood: the sum of the
    log-probabilities of the choice's tokens (after a space) following ``Question: ...\\nAnswer:``."""
    right = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        n = len(tokenizer(context)["input_ids"])
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B matrices are random, so that the adapter changes
    the log-likelihoods (a fresh adapter is the identity)."""
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    return model.eval()


def test_the_shipped_task_is_found_beside_the_package():
    assert shipped_tasks() == {"trace_mini_mc": SHIPPED_LM_EVAL_TASKS / "trace_mini_mc.yaml"}
    docs = questions()
    assert 40 <= len(docs) <= 60
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)


def test_harness_accuracy_equals_the_brute_force_before_and_after(lora_model, tiny_tokenizer):
    plan = plan_benchmarks(LmEvalConfig(tasks=["trace_mini_mc"], limit=LIMIT, batch_size=4))
    report = run_benchmarks(lora_model, tiny_tokenizer, plan)
    docs = questions()[:LIMIT]
    with lora_model.disable_adapter():
        before = brute_force_acc(lora_model, tiny_tokenizer, docs)
    after = brute_force_acc(lora_model, tiny_tokenizer, docs)
    assert before != after  # the adapter matters, so before and after are told apart
    assert report.metrics["lm_eval_trace_mini_mc_acc_before"] == pytest.approx(before)
    assert report.metrics["lm_eval_trace_mini_mc_acc_after"] == pytest.approx(after)
    for when in ("before", "after"):
        assert 0.0 <= report.metrics[f"lm_eval_trace_mini_mc_acc_norm_{when}"] <= 1.0
        assert report.results[when]["n-samples"]["trace_mini_mc"] == {"original": len(questions()), "effective": LIMIT}


def test_metric_names_are_flat():
    assert metric_name("trace_mini_mc", "acc,none", "before") == "lm_eval_trace_mini_mc_acc_before"
    assert metric_name("gsm8k", "exact_match,strict-match", "after") == "lm_eval_gsm8k_exact_match_strict_match_after"


def test_an_unknown_task_is_one_line_naming_the_setting_and_the_local_tasks():
    with pytest.raises(ConfigError) as err:
        plan_benchmarks(LmEvalConfig(tasks=["trace_mini_mc", "no_such_benchmark"]))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("evaluation.lm_eval.tasks: unknown task 'no_such_benchmark'")
    assert "trace_mini_mc" in message


def test_a_users_include_path_task_runs_and_an_absent_folder_is_one_line(tmp_path, lora_model, tiny_tokenizer):
    """A task of the user's own, in the harness's YAML, over a JSONL file named absolutely."""
    rows = questions()[:3]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_text = (SHIPPED_LM_EVAL_TASKS / "trace_mini_mc.yaml").read_text()
    yaml_text = yaml_text.replace("task: trace_mini_mc", "task: my_quiz").replace("test: trace_mini_mc.jsonl", f"test: {tmp_path / 'mine.jsonl'}")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_quiz.yaml").write_text(yaml_text)
    plan = plan_benchmarks(LmEvalConfig(tasks=["my_quiz"], include_path=str(tmp_path / "tasks")))
    after = run_benchmarks(lora_model, tiny_tokenizer, plan).metrics["lm_eval_my_quiz_acc_after"]
    assert after == pytest.approx(brute_force_acc(lora_model, tiny_tokenizer, rows))
    with pytest.raises(ConfigError, match=r"^evaluation\.lm_eval\.include_path: .* is not a folder"):
        plan_benchmarks(LmEvalConfig(tasks=["my_quiz"], include_path=str(tmp_path / "nowhere")))


def test_the_shipped_task_files_key_the_evaluate_stage_only_when_benchmarks_run():
    from trace_realign.flows.config import load_config

    plain = load_config(ROOT / "configs" / "smoke.yaml")
    assert "evaluation.lm_eval.shipped_tasks" not in input_files(plain)
    with_bench = load_config(ROOT / "configs" / "smoke.yaml", ["evaluation.lm_eval.tasks=[trace_mini_mc]"])
    assert input_files(with_bench)["evaluation.lm_eval.shipped_tasks"] == str(SHIPPED_LM_EVAL_TASKS)
    assert EvaluationConfig().lm_eval.tasks == []  # off by default


@pytest.mark.slow
def test_the_evaluate_stage_logs_benchmarks_before_and_after(tmp_path):
    """The smoke config with the shipped task: the evaluate stage's metrics (manifest and MLflow) hold
    each metric before and after, and the harness's results JSON is an evaluation artifact; a changed
    limit reruns the evaluate stage alone."""
    from mlflow import MlflowClient

    from trace_realign.flows.config import load_config
    from trace_realign.flows.realign import realign

    work = tmp_path / "work"
    sets = [f"run.workdir={work}", "evaluation.lm_eval.tasks=[trace_mini_mc]", "evaluation.lm_eval.limit=4"]
    manifest = realign(load_config(ROOT / "configs" / "smoke.yaml", sets).model_dump(mode="json"), progress=False)
    stage = manifest["stages"]["evaluate"]
    for when in ("before", "after"):
        assert 0.0 <= stage["metrics"][f"lm_eval_trace_mini_mc_acc_{when}"] <= 1.0
    results = json.loads(Path(stage["artifacts"]["lm_eval"]["path"]).read_text())
    for when in ("before", "after"):
        assert results[when]["results"]["trace_mini_mc"]["acc,none"] == stage["metrics"][f"lm_eval_trace_mini_mc_acc_{when}"]
        assert results[when]["n-samples"]["trace_mini_mc"]["effective"] == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run_id = stage["mlflow_run_id"]
    logged = client.get_run(run_id).data.metrics
    assert {"lm_eval_trace_mini_mc_acc_before", "lm_eval_trace_mini_mc_acc_after"} <= set(logged)
    assert any(a.path.startswith("evaluation/lm_eval-") for a in client.list_artifacts(run_id, "evaluation"))

    sets[-1] = "evaluation.lm_eval.limit=5"
    again = realign(load_config(ROOT / "configs" / "smoke.yaml", sets).model_dump(mode="json"), progress=False)
    assert {k: v["cached"] for k, v in again["stages"].items() if k in ("train", "evaluate")} == {"train": True, "evaluate": False}
    assert json.loads(Path(again["stages"]["evaluate"]["artifacts"]["lm_eval"]["path"]).read_text())["after"]["n-samples"]["trace_mini_mc"]["effective"] == 5


def test_unknown_task_stops_the_run_before_any_stage(tmp_path):
    """The preflight check: a misspelt benchmark name is one line before loading or judging."""
    from tests.test_pipeline import assert_one_line_error, cli

    work = tmp_path / "w"
    proc = cli(
        ["run", "--config", "smoke", "--set", f"run.workdir={work}", "--set", "evaluation.lm_eval.tasks=[trace_mini_mcq]"],
        tmp_path, timeout=120,
    )
    assert_one_line_error(proc, "evaluation.lm_eval.tasks: unknown task 'trace_mini_mcq'")
    assert not (work / "runs").exists()
