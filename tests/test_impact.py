import random

import pytest
import torch

from tests.conftest import random_text
from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import TraceError
from trace_realign.core.impact import (
    brute_force_scores,
    build_gold_batch,
    gold_gradient,
    impact_scores,
    impact_weights,
    reference_logps,
)
from trace_realign.core.config import LoraConfig, ReferenceTrainingConfig, TriageConfig, WeightsConfig
from trace_realign.core.modeling import add_lora, load_model
from trace_realign.core.objective import Sample, SampleKind
from trace_realign.core.reference import run_reference_stage
from trace_realign.core.tokenization import Encoder
from trace_realign.core.triage import triage_pairs


def make_samples(tokenizer, n=10, seed=0):
    rng = random.Random(seed)
    enc = Encoder(tokenizer, max_length=64)
    kinds = [SampleKind.PREFER, SampleKind.PUNISH, SampleKind.NEGATE]
    out = []
    for i in range(n):
        kind = kinds[i % 3]
        prompt = random_text(rng, rng.randint(2, 12))
        count = 1 if kind == SampleKind.NEGATE else 2
        seqs = tuple(enc.sequence(prompt, random_text(rng, rng.randint(1, 20))) for _ in range(count))
        out.append(Sample(f"s{i}", kind, seqs))
    gold = [
        Sample(f"g{i}", SampleKind.PREFER, (enc.sequence(random_text(rng, 5), random_text(rng, 8)), enc.sequence(random_text(rng, 5), random_text(rng, 6))))
        for i in range(6)
    ]
    return out, gold


def assert_scores_match(model, tokenizer, punish_form="trace"):
    samples, gold = make_samples(tokenizer)
    g_f = gold_gradient(model, gold, 0.3, tokenizer.pad_token_id, batch_size=4)
    fast = impact_scores(model, samples, g_f, 0.3, tokenizer.pad_token_id, punish_form, batch_size=4)
    slow = brute_force_scores(model, samples, g_f, 0.3, tokenizer.pad_token_id, punish_form)
    assert slow.abs().max() > 0
    rel = ((fast.scores - slow).abs() / slow.abs().clamp(min=1e-3 * slow.abs().max())).max().item()
    assert rel < 1e-4, (fast.scores, slow)
    # The same pass gives the reference log-probs.
    ref = reference_logps(model, samples, tokenizer.pad_token_id)
    assert torch.allclose(fast.ref_logps, ref, atol=1e-4)
    return fast.scores


def test_batched_scores_equal_brute_force_with_lora(tiny_model_dir, tiny_tokenizer):
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    scores = assert_scores_match(model, tiny_tokenizer)
    # Scores depend on the initial adapter: another seed gives other values.
    other = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=2)
    assert not torch.allclose(scores, assert_scores_match(other, tiny_tokenizer))


def test_batched_scores_equal_brute_force_with_npo_form(tiny_model_dir, tiny_tokenizer):
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=3)
    assert_scores_match(model, tiny_tokenizer, punish_form="npo")


@pytest.mark.parametrize("tied", [False, True])
def test_batched_scores_equal_brute_force_full_finetuning(tiny_model_dir, tiny_tied_model_dir, tiny_tokenizer, tied):
    model = load_model(tiny_tied_model_dir if tied else tiny_model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    assert_scores_match(model, tiny_tokenizer)


def test_unsupported_trainable_module_is_named(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    extra = torch.nn.Conv1d(1, 1, 1)
    model.model.extra = extra
    samples, gold = make_samples(tiny_tokenizer, n=3)
    g_f = {extra.weight: torch.ones_like(extra.weight)}
    with pytest.raises(TraceError, match="model.extra.weight' of a Conv1d is not supported"):
        impact_scores(model, samples, g_f, 0.3, tiny_tokenizer.pad_token_id)


def test_impact_weights_clip_and_normalise():
    w = impact_weights(torch.tensor([2.0, -1.0, 3.0, 0.0], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.4, 0.0, 0.6, 0.0])
    assert impact_weights(torch.tensor([-1.0, -2.0])).tolist() == [0.0, 0.0]


def _pairs(n, tag):
    return [PreferencePair.create(f"{tag} prompt {i}", f"{tag} chosen {i}", f"{tag} rejected {i}") for i in range(n)]


def test_gold_batch_thirds_and_flips():
    retain, invert, punish = _pairs(30, "r"), _pairs(30, "i"), _pairs(30, "p")
    pool = ["ok 1", "ok 2", "ok 3"]
    gold = build_gold_batch(retain, invert, punish, pool, size=64, seed=7)
    by = {s: [g for g in gold if g.source == s] for s in ("retain", "invert", "punish")}
    assert [len(by[s]) for s in ("retain", "invert", "punish")] == [21, 21, 22]
    assert all(g.preferred.startswith("r chosen") and g.dispreferred.startswith("r rejected") for g in by["retain"])
    assert all(g.preferred.startswith("i rejected") and g.dispreferred.startswith("i chosen") for g in by["invert"])
    assert all(g.preferred in pool and g.dispreferred.startswith("p chosen") for g in by["punish"])
    assert gold == build_gold_batch(retain, invert, punish, pool, size=64, seed=7)
    assert gold != build_gold_batch(retain, invert, punish, pool, size=64, seed=8)


def test_gold_batch_fills_from_other_types():
    gold = build_gold_batch(_pairs(40, "r"), _pairs(3, "i"), [], [], size=30, seed=0)
    assert len(gold) == 30
    assert sum(g.source == "invert" for g in gold) == 3 and sum(g.source == "retain" for g in gold) == 27


def test_reference_stage_weights_and_refs(tiny_model_dir, tiny_tokenizer):
    rng = random.Random(3)
    pairs = [PreferencePair.create(random_text(rng, 4) + f" {i}", random_text(rng, 6), random_text(rng, 7)) for i in range(12)]
    verdicts_c = [False, False, True, None] * 3
    verdicts_r = [True, False, True, True] * 3
    triaged = triage_pairs(pairs, verdicts_c, verdicts_r)
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8), seed=0)
    training = ReferenceTrainingConfig(max_length=64)
    out = run_reference_stage(model, tiny_tokenizer, triaged, training, WeightsConfig(gold_size=6, batch_size=4), TriageConfig())
    kinds = [s.kind for s in out.samples]
    assert kinds.count(SampleKind.PREFER) == 3 and kinds.count(SampleKind.PUNISH) == 3 and kinds.count(SampleKind.RETAIN) == 3
    conflict = [s for s in out.samples if s.kind != SampleKind.RETAIN]
    total = sum(s.weight for s in conflict)
    assert total == pytest.approx(1.0) or total == 0.0
    assert all(s.weight >= 0 for s in out.samples)
    assert all(s.weight == 0 for s in out.samples if s.kind == SampleKind.RETAIN)
    positive = {k for k, v in out.scores.items() if v > 0}
    assert {s.pair_id for s in conflict if s.weight > 0} == positive
    ref = reference_logps(model, conflict, tiny_tokenizer.pad_token_id)
    assert torch.allclose(torch.tensor([s.ref_logps for s in conflict]), ref, atol=1e-4)
    assert len(out.gold) == 6
    # Without impact weighting every conflict sample weighs the same.
    flat = run_reference_stage(model, tiny_tokenizer, triaged, training, WeightsConfig(enabled=False), TriageConfig())
    assert [s.weight for s in flat.samples if s.kind != SampleKind.RETAIN] == pytest.approx([1 / 6] * 6)
