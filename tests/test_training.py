import contextlib
import random

import pytest
import torch

from tests.conftest import random_text
from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import TraceError
from trace_realign.core.impact import reference_logps
from trace_realign.core.logprobs import forward_logits, response_logps
from trace_realign.core.losses import retain_kl
from trace_realign.core.config import LoraConfig, TrainingConfig, TriageConfig, WeightsConfig
from trace_realign.core.modeling import add_lora, load_adapter, load_model
from trace_realign.core.objective import SampleKind, build_samples
from trace_realign.core.reference import run_reference_stage
from trace_realign.core.tokenization import Encoder, pad_sequences
from trace_realign.core.training import InjectedFailure, save_output, train
from trace_realign.core.triage import TriagedPair, TriageType, triage_pairs

LORA = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])


def triaged_set(n=12, seed=0):
    rng = random.Random(seed)
    pairs = [
        PreferencePair.create(f"{random_text(rng, 4)} {i}", random_text(rng, 6), random_text(rng, 7)) for i in range(n)
    ]
    return triage_pairs(pairs, [False, False, True] * (n // 3), [True, False, True] * (n // 3))


def settings(**kw):
    base = dict(
        learning_rate=5e-3,
        warmup_steps=0,
        lr_scheduler="constant",
        max_steps=8,
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        logging_steps=1,
        alpha_kl=1.0,
        max_length=64,
    )
    base.update(kw)
    return TrainingConfig(**base)


def prepared(tiny_model_dir, tokenizer, tmp_path, weighted=True, use_kl=True):
    model = add_lora(load_model(tiny_model_dir), LORA, seed=0)
    model.save_pretrained(tmp_path / "initial_adapter")
    ref = run_reference_stage(
        model, tokenizer, triaged_set(), settings(use_kl=use_kl), WeightsConfig(gold_size=6, enabled=weighted), TriageConfig()
    )
    return model, ref


def mean_kl(model, sequences, pad):
    """Mean per-token KL(reference || model) over the response tokens of ``sequences``."""
    batch = pad_sequences(sequences, pad)
    logits = forward_logits(model, batch)
    with model.disable_adapter():
        ref_logits = forward_logits(model, batch)
    return retain_kl(ref_logits[:, :-1], logits[:, :-1], batch.response_mask[:, 1:]).mean().item()


def measures(model, samples, tokenizer):
    """Mean INVERT margin, mean PUNISH log-prob, mean KL on RETAIN and on PUNISH responses."""
    pad = tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        invert = [s for s in samples if s.kind == SampleKind.PREFER]
        punish = [s for s in samples if s.kind == SampleKind.PUNISH]
        retain = [s for s in samples if s.kind == SampleKind.RETAIN]
        inv = reference_logps(model, invert, pad)
        pun = reference_logps(model, punish, pad)
        kl_retain = mean_kl(model, [s.sequences[0] for s in retain], pad)
        kl_punish = mean_kl(model, [q for s in punish for q in s.sequences], pad)
    return (inv[:, 0] - inv[:, 1]).mean().item(), pun.mean().item(), kl_retain, kl_punish


def test_training_moves_the_model_the_right_way(tiny_model_dir, tiny_tokenizer, tmp_path):
    model, ref = prepared(tiny_model_dir, tiny_tokenizer, tmp_path, weighted=False)
    margin0, punish0, kl0, _ = measures(model, ref.samples, tiny_tokenizer)
    assert kl0 == pytest.approx(0.0, abs=1e-6)
    result = train(model, tiny_tokenizer, ref.samples, settings(), tmp_path / "out", progress=False)
    margin1, punish1, kl1, _ = measures(model, ref.samples, tiny_tokenizer)
    assert result.global_step == 8
    assert margin1 > margin0 + 1.0, (margin0, margin1)
    assert punish1 < punish0 - 1.0, (punish0, punish1)
    # RETAIN responses stay close to the reference (measured: 0.14 nats/token; 1.35 without the KL term).
    assert kl1 < 0.3, kl1
    logged = [h for h in result.log_history if "loss" in h]
    assert logged and "prefer_margin" in logged[-1] and "retain_kl" in logged[-1]


def test_kl_term_holds_retain_behaviour(tiny_model_dir, tiny_tokenizer, tmp_path):
    model, ref = prepared(tiny_model_dir, tiny_tokenizer, tmp_path, weighted=False)
    train(model, tiny_tokenizer, ref.samples, settings(alpha_kl=0.0), tmp_path / "a", progress=False)
    kl_without = measures(model, ref.samples, tiny_tokenizer)[2]
    model2, ref2 = prepared(tiny_model_dir, tiny_tokenizer, tmp_path, weighted=False)
    train(model2, tiny_tokenizer, ref2.samples, settings(alpha_kl=1.0), tmp_path / "b", progress=False)
    kl_with = measures(model2, ref2.samples, tiny_tokenizer)[2]
    assert kl_with < 0.2 * kl_without, (kl_with, kl_without)


def test_zero_weight_samples_do_not_train(tiny_model_dir, tiny_tokenizer, tmp_path):
    from dataclasses import replace

    model, ref = prepared(tiny_model_dir, tiny_tokenizer, tmp_path, use_kl=False)
    zero = [replace(s, weight=0.0) for s in ref.samples]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, tiny_tokenizer, zero, settings(max_steps=2), tmp_path / "z", progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_interrupted_and_resumed_run_ends_with_same_weights(tiny_model_dir, tiny_tokenizer, tmp_path):
    lora = LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])  # dropout exercises the RNG
    base = add_lora(load_model(tiny_model_dir), lora, seed=0)
    base.save_pretrained(tmp_path / "init")
    ref = run_reference_stage(base, tiny_tokenizer, triaged_set(), settings(), WeightsConfig(gold_size=6), TriageConfig())
    s = settings(max_steps=6, per_device_batch_size=2, gradient_accumulation_steps=2, save_steps=3, lr_scheduler="cosine", warmup_steps=2)

    def fresh():
        return load_adapter(load_model(tiny_model_dir), tmp_path / "init", trainable=True)

    full = fresh()
    train(full, tiny_tokenizer, ref.samples, s, tmp_path / "full", progress=False)
    broken = fresh()
    with pytest.raises(InjectedFailure):
        train(broken, tiny_tokenizer, ref.samples, s, tmp_path / "resumed", progress=False, fail_at_step=3)
    resumed = fresh()
    result = train(resumed, tiny_tokenizer, ref.samples, s, tmp_path / "resumed", progress=False, resume_from_checkpoint=True)
    assert result.global_step == 6
    a = dict(full.named_parameters())
    changed = False
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=1e-5, atol=1e-6)
            changed |= not torch.equal(p, dict(fresh().named_parameters())[n])
    assert changed


def test_output_loads_back_with_transformers(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ref = prepared(tiny_model_dir, tiny_tokenizer, tmp_path)
    train(model, tiny_tokenizer, ref.samples, settings(max_steps=3), tmp_path / "out", progress=False)
    model.eval()
    batch = pad_sequences([ref.samples[0].sequences[0]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = response_logps(forward_logits(model, batch), batch)
    paths = save_output(model, tiny_tokenizer, tmp_path / "final", merge=True)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), paths["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(paths["merged"]).eval()
    with torch.no_grad():
        for m in (reloaded, merged):
            torch.testing.assert_close(response_logps(forward_logits(m, batch), batch), expected, rtol=1e-4, atol=1e-4)


def test_full_finetuning_needs_a_reference_copy(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_dir)
    ref_model = load_model(tiny_model_dir)
    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = build_samples(triaged_set(), enc)
    ref = reference_logps(model, samples, tiny_tokenizer.pad_token_id)
    from dataclasses import replace

    samples = [replace(s, ref_logps=tuple(ref[i].tolist())) for i, s in enumerate(samples)]
    with pytest.raises(TraceError, match="frozen reference"):
        train(model, tiny_tokenizer, samples, settings(max_steps=1), tmp_path / "x", progress=False)
    model.train()
    result = train(model, tiny_tokenizer, samples, settings(max_steps=2, learning_rate=1e-3), tmp_path / "y", progress=False, ref_model=ref_model)
    assert result.global_step == 2
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    assert changed


def test_ablation_switches_build_the_right_samples(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=64)
    pair = PreferencePair.create("q", "old winner", "old loser")
    t = [
        TriagedPair(pair, TriageType.INVERT, False, True),
        TriagedPair(PreferencePair.create("q2", "w2", "l2"), TriageType.PUNISH, False, False, correction="fixed"),
        TriagedPair(PreferencePair.create("q3", "w3", "l3"), TriageType.RETAIN, True, False),
        TriagedPair(PreferencePair.create("q4", "w4", "l4"), TriageType.UNKNOWN, None, None),
    ]

    def decoded(s):
        return [tiny_tokenizer.decode(q.input_ids[q.response_start :]).replace("<|im_end|>", "") for q in s.sequences]

    full = build_samples(t, enc)
    assert [s.kind for s in full] == [SampleKind.PREFER, SampleKind.PUNISH, SampleKind.RETAIN]
    assert decoded(full[0]) == ["old loser", "old winner"]  # INVERT: the old loser is now preferred
    assert decoded(full[1]) == ["w2", "l2"]
    corrected = build_samples(t, enc, use_corrections=True)
    assert corrected[1].kind == SampleKind.PREFER and decoded(corrected[1]) == ["fixed", "w2"]
    assert [s.kind for s in build_samples(t, enc, use_kl=False)] == [SampleKind.PREFER, SampleKind.PUNISH]
    # No triage pushes down the rejected response of the relabelled pair: for INVERT the old winner
    # (which the new policy rejects), never the old loser it now prefers; UNKNOWN has no relabelling.
    no_triage = build_samples(t, enc, use_triage=False)
    assert [s.kind for s in no_triage] == [SampleKind.NEGATE] * 3
    assert [decoded(s) for s in no_triage] == [["old winner"], ["l2"], ["l3"]]
    assert [s.pair_id for s in no_triage] == [x.pair.pair_id for x in t[:3]]


def test_no_triage_never_pushes_down_a_response_the_new_policy_prefers(tiny_tokenizer):
    """A sibling case: every INVERT pair, whatever its texts, has its compliant old loser kept and
    its violating old winner pushed down; the corrections switch does not change that."""
    enc = Encoder(tiny_tokenizer, max_length=64)
    inverts = [TriagedPair(PreferencePair.create(f"p{i}", f"violating {i}", f"compliant {i}"), TriageType.INVERT, False, True) for i in range(3)]
    for corrections in (False, True):
        samples = build_samples(inverts, enc, use_triage=False, use_corrections=corrections)
        pushed = [tiny_tokenizer.decode(s.sequences[0].input_ids[s.sequences[0].response_start :]).replace("<|im_end|>", "") for s in samples]
        assert pushed == ["violating 0", "violating 1", "violating 2"]


@pytest.mark.parametrize("full_finetune", [False, True])
def test_training_on_response_tokens_equals_training_on_full_logits(tiny_model_dir, tiny_tokenizer, tmp_path, full_finetune):
    """The trainer's loss (log-probs and the RETAIN KL at response tokens only) steps like the full-vocabulary one."""
    from trace_realign.core.logprobs import full_vocabulary_logits

    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    base = add_lora(load_model(tiny_model_dir), lora, seed=0)
    base.save_pretrained(tmp_path / "init")
    ref = run_reference_stage(base, tiny_tokenizer, triaged_set(), settings(), WeightsConfig(gold_size=6), TriageConfig())
    s = settings(max_steps=3, per_device_batch_size=4)

    def run(folder, full):
        if full_finetune:
            model, kw = load_model(tiny_model_dir), {"ref_model": load_model(tiny_model_dir)}
            model.train()
        else:
            model, kw = load_adapter(load_model(tiny_model_dir), tmp_path / "init", trainable=True), {}
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        with full_vocabulary_logits() if full else contextlib.nullcontext():
            result = train(model, tiny_tokenizer, ref.samples, s, tmp_path / folder, progress=False, **kw)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the steps moved the weights
        return before, after, [(h["loss"], h.get("retain_kl")) for h in result.log_history if "loss" in h]

    _, chunked, chunked_losses = run("chunked", False)
    before, full, full_losses = run("full", True)
    assert len(full_losses) == 3 and all(kl is not None for _, kl in full_losses)  # RETAIN KL in every step's loss
    for (a, ka), (b, kb) in zip(chunked_losses, full_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) and ka == pytest.approx(kb, rel=1e-4, abs=1e-6)
    # The two paths' gradients differ by float32 rounding (tests/test_logprobs.py bounds that against
    # float64). Adam's first updates are about lr * sign(g), so where an element's gradient is near 0
    # the rounding can move it by up to 2 lr: the weights are compared normwise, to 1% of how far the
    # 3 steps moved each tensor (a wrong gradient moves most elements by about lr), and the losses of
    # steps 2 and 3 above, taken at the stepped weights, to 1e-5.
    for p, q, p0 in zip(chunked, full, before, strict=True):
        assert (p - q).norm() <= 1e-2 * (q - p0).norm(), ((p - q).norm() / (q - p0).norm()).item()


def test_smaller_device_batches_with_more_accumulation_make_the_same_steps(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The demo's 2 samples x 4 accumulation steps against 4 x 2: the same samples in each optimizer
    step (the sampler's order does not depend on the split) and the same per-sample mean loss, so
    the same weights; the memory of a forward is what changes."""
    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    base = add_lora(load_model(tiny_model_dir), lora, seed=0)
    base.save_pretrained(tmp_path / "init")
    ref = run_reference_stage(base, tiny_tokenizer, triaged_set(), settings(), WeightsConfig(gold_size=6), TriageConfig())

    def run(folder, batch, accumulation):
        model = load_adapter(load_model(tiny_model_dir), tmp_path / "init", trainable=True)
        s = settings(max_steps=3, per_device_batch_size=batch, gradient_accumulation_steps=accumulation)
        result = train(model, tiny_tokenizer, ref.samples, s, tmp_path / folder, progress=False)
        return [p.detach() for p in model.parameters() if p.requires_grad], [h["loss"] for h in result.log_history if "loss" in h]

    wide, wide_losses = run("4x2", 4, 2)
    split, split_losses = run("2x4", 2, 4)
    assert len(wide_losses) == 3 and split_losses == pytest.approx(wide_losses, rel=1e-5)
    for p, q in zip(split, wide):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    moved, _ = run("1x4", 1, 4)  # a different global batch: other steps (the test can tell)
    assert any(not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(moved, wide))
