"""Plain DPO (trace_core.alignment): the objective that makes an old-aligned model, and the naive
relabelling baseline."""

import random

import torch

from tests.conftest import random_text
from trace_realign.core.alignment import dpo_align, dpo_samples
from trace_realign.core.config import DpoConfig
from trace_realign.core.data import PreferencePair
from trace_realign.core.impact import reference_logps
from trace_realign.core.modeling import is_peft, load_model
from trace_realign.core.objective import SampleKind
from trace_realign.core.tokenization import Encoder


def _pairs(n=12, seed=0):
    rng = random.Random(seed)
    return [PreferencePair.create(f"{random_text(rng, 6)} {i}", random_text(rng, 10), random_text(rng, 10)) for i in range(n)]


def test_dpo_samples_prefer_chosen_over_rejected(tiny_tokenizer):
    pairs = _pairs(3)
    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = dpo_samples(pairs, enc)
    assert [s.kind for s in samples] == [SampleKind.PREFER] * 3
    for s, p in zip(samples, pairs):
        assert s.sequences == (enc.sequence(p.prompt, p.chosen), enc.sequence(p.prompt, p.rejected))


def test_dpo_raises_the_margin_and_returns_a_plain_merged_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    pairs = _pairs(12)
    enc = Encoder(tiny_tokenizer, max_length=64)
    samples = dpo_samples(pairs, enc)
    pad = tiny_tokenizer.pad_token_id
    base = load_model(tiny_model_dir)
    before = reference_logps(base, samples, pad)
    config = DpoConfig(learning_rate=5e-3, max_steps=12, per_device_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0, max_length=64)
    merged, result = dpo_align(load_model(tiny_model_dir), tiny_tokenizer, pairs, config, tmp_path)
    assert not is_peft(merged) and result.global_step == 12 and result.pairs == 12
    after = reference_logps(merged, samples, pad)
    margin_before = (before[:, 0] - before[:, 1]).mean().item()
    margin_after = (after[:, 0] - after[:, 1]).mean().item()
    # The trainer's own record of the margin (policy minus reference log-ratio) agrees in sign.
    assert margin_after - margin_before > 1.0 and result.final["prefer_margin"] > 0
    # Merging folded the adapter in: the saved folder reloads to the same log-probs.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged")
    assert torch.allclose(reference_logps(reloaded, samples, pad), after, atol=1e-4)
