"""Plain DPO on preference pairs: how a model gets aligned to an old policy in the first place.

TRACE starts from a model that was preference-aligned under an old policy. The demo needs such a
model: SmolLM2-135M-Instruct itself was never trained on the demo's old preference set, so it
does not refuse what the old policy refused. :func:`dpo_align` makes that old-aligned model the
way the story says it was made -- DPO of the base model on the old pairs (chosen over rejected) --
with LoRA, then folds the adapter into the weights so the result is an ordinary model folder
that TRACE can take as ``M_ref``.

The same objective is the "naive relabelling" baseline of method.md when the pairs have been
relabelled under the new policy first. It reuses the TRACE trainer: every pair is one PREFER
sample with weight 1 (``weight_normalization="mean"``) and no RETAIN term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import TraceError
from trace_realign.core.impact import reference_logps
from trace_realign.core.modeling import LoraSettings, add_lora
from trace_realign.core.objective import Sample, SampleKind
from trace_realign.core.tokenization import Encoder
from trace_realign.core.training import TrainSettings, train, training_arguments


@dataclass(frozen=True)
class DpoSettings:
    """Settings of a plain DPO run (LoRA, merged at the end)."""

    beta: float = 0.1
    learning_rate: float = 5e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    warmup_steps: int = 4
    lr_scheduler: str = "cosine"
    max_length: int = 192
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    batch_size: int = 8  # reference log-prob pass

    def as_dict(self) -> dict:
        d = asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d


@dataclass
class DpoResult:
    global_step: int
    pairs: int
    log_history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # the last logged margin/accuracy/loss values


def dpo_samples(pairs: Sequence[PreferencePair], encoder: Encoder) -> list[Sample]:
    """One PREFER sample per pair: chosen over rejected."""
    return [
        Sample(p.pair_id, SampleKind.PREFER, (encoder.sequence(p.prompt, p.chosen), encoder.sequence(p.prompt, p.rejected)))
        for p in pairs
    ]


def dpo_align(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    settings: DpoSettings,
    work_dir: str | Path,
    *,
    progress: Callable[[str, int, int], None] | None = None,
):
    """DPO-train ``model`` on ``pairs`` with a fresh LoRA adapter; return (merged model, result).

    ``model`` is the base model (its weights are the DPO reference). The returned model is the
    base with the trained adapter merged in: a plain transformers model to ``save_pretrained``.
    ``work_dir`` receives the trainer's scratch output (no checkpoints are written).
    """
    if not pairs:
        raise TraceError("dpo: no preference pairs")
    encoder = Encoder(tokenizer, max_length=settings.max_length)
    peft_model = _with_lora(model, settings)
    samples = dpo_samples(pairs, encoder)
    # LoRA B starts at 0, so the adapted model is the reference here: one no-grad pass gives
    # every reference log-prob the loss needs.
    done = [0]

    def step(n):
        done[0] += n
        if progress:
            progress("reference", done[0], len(samples))

    ref = reference_logps(peft_model, samples, tokenizer.pad_token_id, settings.batch_size, step)
    samples = [replace(s, weight=1.0 / len(samples), ref_logps=(float(ref[i, 0]), float(ref[i, 1]))) for i, s in enumerate(samples)]
    train_settings = _train_settings(settings, disable_tqdm=progress is None)
    result = train(peft_model, tokenizer, samples, train_settings, work_dir)
    return _merged(peft_model, result.global_step, len(pairs), result.log_history)


def _with_lora(model, settings: DpoSettings):
    """``model`` with a fresh LoRA adapter of ``settings``."""
    lora = LoraSettings(settings.lora_r, settings.lora_alpha, settings.lora_dropout, list(settings.lora_target_modules))
    return add_lora(model, lora, seed=settings.seed)


def _train_settings(settings: DpoSettings, *, disable_tqdm: bool) -> TrainSettings:
    """The trainer settings of a plain run: every logged step, no checkpoints, no KL."""
    return TrainSettings(
        beta=settings.beta,
        alpha_kl=0.0,
        weight_normalization="mean",  # weight 1/N scaled by N: every pair counts 1, as in DPO
        learning_rate=settings.learning_rate,
        lr_scheduler=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        logging_steps=1,
        save_steps=0,
        seed=settings.seed,
        disable_tqdm=disable_tqdm,
    )


def _merged(peft_model, global_step: int, n_pairs: int, log_history: list[dict]):
    """Fold the trained adapter into the weights; (plain model in eval mode, result)."""
    logged = [h for h in log_history if "loss" in h]
    final = {k: v for k, v in (logged[-1] if logged else {}).items() if isinstance(v, (int, float))}
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, DpoResult(global_step, n_pairs, list(log_history), final)


class _SftCollator:
    """Right-padded (prompt, response) sequences with labels on the response tokens only."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, sequences):
        from trace_realign.core.tokenization import pad_sequences

        batch = pad_sequences(sequences, self.pad_token_id)
        labels = batch.input_ids.masked_fill(batch.response_mask == 0, -100)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}


def sft_align(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    settings: DpoSettings,
    work_dir: str | Path,
):
    """Supervised fine-tuning on the chosen responses (LoRA, merged): the cheaper way to make a
    model follow the policy that chose them (one sequence per pair, no reference pass).
    Returns (merged model, result); ``settings.beta`` is unused."""
    from transformers import Trainer

    if not pairs:
        raise TraceError("sft: no preference pairs")
    encoder = Encoder(tokenizer, max_length=settings.max_length)
    sequences = [encoder.sequence(p.prompt, p.chosen) for p in pairs]  # the data set: a list
    peft_model = _with_lora(model, settings)
    args = training_arguments(_train_settings(settings, disable_tqdm=True), work_dir)
    trainer = Trainer(model=peft_model, args=args, train_dataset=sequences, data_collator=_SftCollator(tokenizer.pad_token_id))
    trainer.train()
    return _merged(peft_model, trainer.state.global_step, len(pairs), trainer.state.log_history)
