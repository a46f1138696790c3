"""Plain DPO (trace_core.alignment): the objective that makes an old-aligned model, and the naive
relabelling baseline."""

import random

import pytest
import torch

from tests.conftest import random_text
from trace_realign.core.alignment import dpo_align, dpo_samples, sft_align
from trace_realign.core.config import AlignmentConfig, DpoConfig
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


def _plain_sft(model, tokenizer, pairs, config, work_dir, seed=0):
    """The SFT of trace_core.alignment with the model's own ``labels`` loss (full-vocabulary logits):
    the brute-force reference the response-token loss is checked against."""
    from transformers import Trainer

    from trace_realign.core.alignment import _merged, _SftCollator
    from trace_realign.core.modeling import add_lora
    from trace_realign.core.training import training_arguments

    class LabelsOnly(_SftCollator):
        def __call__(self, sequences):
            batch = super().__call__(sequences)
            del batch["response_mask"]
            return batch

    encoder = Encoder(tokenizer, max_length=config.max_length)
    peft_model = add_lora(model, config.lora, seed=seed)
    trainer = Trainer(
        model=peft_model, args=training_arguments(config, work_dir, seed=seed, progress=False),
        train_dataset=[encoder.sequence(p.prompt, p.chosen) for p in pairs], data_collator=LabelsOnly(tokenizer.pad_token_id),
    )
    trainer.train()
    return _merged(peft_model, trainer.state.global_step, len(pairs), trainer.state.log_history)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_sft_trains_as_the_models_labels_loss_does(tiny_model_dir, tiny_tokenizer, tmp_path, accumulation):
    """sft_align's loss at the response tokens only against the model's own labels loss over [N, T, V]
    logits: the same logged losses and the same merged weights after 4 optimizer steps, with and
    without gradient accumulation (the Trainer then divides by the step's target tokens)."""
    pairs = _pairs(16)
    config = AlignmentConfig(
        learning_rate=5e-3, max_steps=4, per_device_batch_size=3, gradient_accumulation_steps=accumulation, warmup_steps=0, max_length=48
    )
    merged, result = sft_align(load_model(tiny_model_dir), tiny_tokenizer, pairs, config, tmp_path / "ours")
    reference, expected = _plain_sft(load_model(tiny_model_dir), tiny_tokenizer, pairs, config, tmp_path / "plain")
    assert result.global_step == expected.global_step == 4
    ours = [h["loss"] for h in result.log_history if "loss" in h]
    plain = [h["loss"] for h in expected.log_history if "loss" in h]
    assert len(ours) == 4 and ours == pytest.approx(plain, rel=1e-5)
    assert ours[-1] < ours[0]  # it learns
    theirs = dict(reference.named_parameters())
    for name, weight in merged.named_parameters():
        torch.testing.assert_close(weight, theirs[name], rtol=1e-5, atol=1e-6)
