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


# Oracle verdicts and gold verdicts disagree on purpose: gold_dpo must follow the gold ones.
GOLD_TRIAGED = [
    TriagedPair(PreferencePair.create("g1", "w1", "l1"), TriageType.RETAIN, True, False, None, False, True),  # gold INVERT
    TriagedPair(PreferencePair.create("g2", "w2", "l2"), TriageType.INVERT, False, True, None, True, False),  # gold RETAIN
    TriagedPair(PreferencePair.create("g3", "w3", "l3"), TriageType.INVERT, False, True, None, False, False),  # gold PUNISH
    TriagedPair(PreferencePair.create("g4", "w4", "l4"), TriageType.UNKNOWN, None, None, None, True, None),  # gold RETAIN
    TriagedPair(PreferencePair.create("g5", "w5", "l5"), TriageType.RETAIN, True, True),  # no gold label
    TriagedPair(PreferencePair.create("g6", "w6", "l6"), TriageType.PUNISH, False, False, None, None, True),  # gold UNKNOWN
]


def test_gold_dpo_prefers_the_gold_relabelled_winner_and_ignores_the_oracle(tiny_tokenizer):
    from dataclasses import replace

    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = build_samples(GOLD_TRIAGED, enc, method="gold_dpo")
    assert [s.kind for s in samples] == [SampleKind.PREFER] * 3
    assert [s.pair_id for s in samples] == [GOLD_TRIAGED[i].pair.pair_id for i in (0, 1, 3)]
    assert texts(tiny_tokenizer, samples) == [["l1", "w1"], ["w2", "l2"], ["w4", "l4"]]  # gold INVERT swapped, RETAIN as is
    # Oracle noise changes the oracle's verdicts and triage types, never the gold labels.
    noisy = [replace(t, type=TriageType.PUNISH, chosen_compliant=False, rejected_compliant=False, noise="flip") for t in GOLD_TRIAGED]
    assert texts(tiny_tokenizer, build_samples(noisy, enc, method="gold_dpo")) == texts(tiny_tokenizer, samples)


def test_gold_dpo_reads_every_triage_shard_and_without_gold_labels_fails_naming_the_setting(tiny_tokenizer):
    from trace_realign.core.errors import ConfigError
    from trace_realign.core.reference import check_gold_labels, samples_for, triage_kinds

    assert triage_kinds(settings(method="gold_dpo")) == ("invert", "punish", "retain", "unknown")
    assert triage_kinds(settings(method="naive_relabel_dpo")) == ("invert", "punish", "retain")
    check_gold_labels(TRIAGED, settings(method="naive_relabel_dpo"))  # other methods need none
    with pytest.raises(ConfigError, match=r"^training.method: gold_dpo needs gold labels .* triage.gold_labels_path"):
        samples_for(TRIAGED, Encoder(tiny_tokenizer, max_length=64), settings(method="gold_dpo"), TriageConfig())


def test_gold_labels_come_from_a_file_or_the_annotations(tmp_path):
    from trace_realign.core.evaluation.labels import load_generation_labels
    from trace_realign.core.oracle.verdicts import gold_from_annotations, gold_from_labels
    from trace_realign.core.policy import Policy

    chat = [{"role": "user", "content": "q2"}]
    pairs = [PreferencePair.create("q1", "w1", "l1"), PreferencePair.create(chat, "w2", "l2")]
    path = tmp_path / "gold.jsonl"
    lines = [{"prompt": "q1", "response": "w1", "compliant": False}, {"prompt": "q1", "response": "l1", "compliant": True},
             {"prompt": "q2", "response": "w2", "compliant": True}, {"prompt": "q9", "response": "w1", "compliant": True}]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    labels = load_generation_labels(path, setting="triage.gold_labels_path")
    assert gold_from_labels(pairs, labels) == [(False, True), (True, None)]  # a chat prompt matches its text
    with pytest.raises(TraceError, match=r"labelled responses file not found \(triage.gold_labels_path\)"):
        load_generation_labels(tmp_path / "missing.jsonl", setting="triage.gold_labels_path")

    rules = {"require_safe": True}
    annotated = [PreferencePair.create("q", "w", "l", chosen_annotations={"is_safe": False}, rejected_annotations={"is_safe": True})]
    assert gold_from_annotations(annotated, Policy(name="p", version=None, text="p", sha256="0" * 64, rules=rules)) == [(False, True)]
    assert gold_from_annotations(pairs, Policy(name="p", version=None, text="p", sha256="0" * 64, rules=rules)) is None  # no annotations
    assert gold_from_annotations(annotated, Policy(name="p", version=None, text="p", sha256="0" * 64)) is None  # no rules


def test_a_gold_labels_file_is_fingerprinted_and_checked_before_the_run(tmp_path):
    from trace_realign.core.config import input_files
    from trace_realign.core.errors import ConfigError
    from trace_realign.flows.config import validate_config
    from trace_realign.flows.preflight import preflight

    policy = tmp_path / "policy.md"
    policy.write_text("Be helpful.\n", encoding="utf-8")
    data = tmp_path / "pairs.jsonl"
    data.write_text("", encoding="utf-8")
    gold = tmp_path / "gold.jsonl"
    tree = {"model": {"path": "tiny-random"}, "data": {"path": str(data)}, "policy": {"path": str(policy)},
            "oracle": {"backend": "annotations"}, "triage": {"gold_labels_path": str(gold)}}  # fmt: skip
    with pytest.raises(ConfigError, match="^triage.gold_labels_path: file not found"):
        preflight(validate_config(tree))
    gold.write_text('{"prompt": "q", "response": "r", "compliant": "maybe"}\n', encoding="utf-8")
    with pytest.raises(TraceError, match="'compliant' must be true or false"):
        preflight(validate_config(tree))
    gold.write_text('{"prompt": "q", "response": "r", "compliant": true}\n', encoding="utf-8")
    preflight(validate_config(tree))
    assert input_files(validate_config(tree))["triage.gold_labels_path"] == str(gold)
