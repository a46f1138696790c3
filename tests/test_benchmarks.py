"""The GPU check's plumbing that can run here: its random-weight model builder and its usage line.

(The benchmarks themselves print measurements and are run by hand or by benchmarks/gpu_check.sh on
a GPU machine; they are not timed in tests.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_pipeline import ROOT


def test_random_model_keeps_the_tokenizer_and_resizes_the_architecture(tiny_model_dir, tmp_path):
    from trace_realign.core.modeling import load_model, load_tokenizer

    out = tmp_path / "resized"
    proc = subprocess.run(
        [sys.executable, "benchmarks/random_model.py", "--from", str(tiny_model_dir), "--out", str(out),
         "--hidden-size", "48", "--intermediate-size", "96", "--layers", "3", "--heads", "4", "--kv-heads", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (48, 96, 3)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 12)
    model = load_model(out)
    n = sum(p.numel() for p in model.parameters())
    assert proc.stdout.strip().splitlines()[-1] == f"random_model_params={n}"
    assert load_tokenizer(out).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()


def test_random_model_rejects_heads_that_do_not_divide_the_width(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/random_model.py", "--from", str(tiny_model_dir), "--out", str(tmp_path / "m"),
         "--hidden-size", "50", "--heads", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "--hidden-size 50 is not a multiple of --heads 4"
    assert not (tmp_path / "m").exists()


def test_gpu_check_says_how_to_use_it():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "usage: bash benchmarks/gpu_check.sh prepare|run" in proc.stdout
