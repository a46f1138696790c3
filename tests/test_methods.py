"""The objectives a run can train (``training.method``): what each trains on, with which loss and
weights, and that the baselines train end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import ROOT, cli
from tests.test_training import settings, triaged_set
from trace_realign.core.config import LoraConfig, TriageConfig, WeightsConfig
from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import TraceError
from trace_realign.core.losses import dpo_loss, robust_dpo_loss
from trace_realign.core.modeling import add_lora, load_model
from trace_realign.core.objective import SampleKind, baseline_samples, build_samples, conflict_losses
from trace_realign.core.reference import run_reference_stage, training_samples, weights_table
from trace_realign.core.tokenization import Encoder
from trace_realign.core.triage import TriagedPair, TriageType

TRIAGED = [
    TriagedPair(PreferencePair.create("q1", "w1", "l1"), TriageType.INVERT, False, True),
    TriagedPair(PreferencePair.create("q2", "w2", "l2"), TriageType.PUNISH, False, False),
    TriagedPair(PreferencePair.create("q3", "w3", "l3"), TriageType.RETAIN, True, False),
    TriagedPair(PreferencePair.create("q4", "w4", "l4"), TriageType.RETAIN, True, True),
    TriagedPair(PreferencePair.create("q5", "w5", "l5"), TriageType.UNKNOWN, None, False),
]


def texts(tokenizer, samples):
    return [
        [tokenizer.decode(q.input_ids[q.response_start :]).replace("<|im_end|>", "") for q in s.sequences] for s in samples
    ]


@pytest.mark.parametrize("method", ["naive_relabel_dpo", "robust_dpo"])
def test_relabel_baselines_prefer_the_relabelled_winner_and_drop_punish(tiny_tokenizer, method):
    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = build_samples(TRIAGED, enc, method=method, use_triage=False, use_kl=True, use_corrections=True)
    assert [s.kind for s in samples] == [SampleKind.PREFER] * 3
    assert texts(tiny_tokenizer, samples) == [["l1", "w1"], ["w3", "l3"], ["w4", "l4"]]  # INVERT swapped, RETAIN as is


def test_npo_baseline_pushes_down_every_violating_response(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = build_samples(TRIAGED, enc, method="npo")
    assert [s.kind for s in samples] == [SampleKind.NEGATE] * 5
    # INVERT's old winner, both PUNISH responses, RETAIN's violating loser, UNKNOWN's known-violating loser
    assert texts(tiny_tokenizer, samples) == [["w1"], ["w2"], ["l2"], ["l3"], ["l5"]]
    with pytest.raises(ValueError, match="unknown baseline method 'trace'"):
        baseline_samples(TRIAGED, enc, "trace")


def test_robust_dpo_is_the_prefer_loss_when_a_flip_rate_is_given():
    torch.manual_seed(0)
    kinds = torch.tensor([SampleKind.PREFER, SampleKind.PREFER])
    policy, ref = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    args = (policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], 0.3)
    assert torch.allclose(conflict_losses(kinds, policy, ref, 0.3), dpo_loss(*args))
    assert torch.allclose(conflict_losses(kinds, policy, ref, 0.3, robust_epsilon=0.2), robust_dpo_loss(*args, 0.2))
    assert not torch.allclose(dpo_loss(*args), robust_dpo_loss(*args, 0.2))


def test_baselines_train_with_uniform_weights_and_join_back_in_sample_order(tiny_model_dir, tiny_tokenizer):
    """npo gives two samples for a pair whose responses both violate: the weights table keeps one row per
    sample and training joins them back in order; a table from other settings is one line."""
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8), seed=0)
    triaged = triaged_set()
    training = settings(method="npo")
    out = run_reference_stage(model, tiny_tokenizer, triaged, training, WeightsConfig(gold_size=6), TriageConfig())
    assert out.gold == [] and out.scores == {}  # no impact weighting for a baseline
    n = len(out.samples)
    assert n > len({s.pair_id for s in out.samples})  # some pair gave two samples
    assert all(s.weight == pytest.approx(1 / n) for s in out.samples)
    table = weights_table(out, triaged)
    back = training_samples(triaged, tiny_tokenizer, training, TriageConfig(), table)
    assert [(s.pair_id, s.kind, s.ref_logps) for s in back] == [(s.pair_id, s.kind, s.ref_logps) for s in out.samples]
    with pytest.raises(TraceError, match="rows for .* samples; rerun with --fresh reference"):
        training_samples(triaged, tiny_tokenizer, settings(method="naive_relabel_dpo"), TriageConfig(), table)


@pytest.mark.parametrize("method", ["naive_relabel_dpo", "npo"])
def test_a_baseline_runs_the_whole_dag(tmp_path, method):
    work = tmp_path / "work"
    proc = cli(
        ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--no-progress", "--set", f"run.workdir={work}",
         "--set", f"training.method={method}", "--set", "training.max_steps=2", "--set", "evaluation.max_prompts=3"],
        ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    assert manifest["config"]["training"]["method"] == method
    assert manifest["stages"]["train"]["metrics"]["global_step"] == 2
    assert manifest["stages"]["reference"]["metrics"]["gold_size"] == 0
    assert "tpa_after" in manifest["stages"]["evaluate"]["metrics"]
