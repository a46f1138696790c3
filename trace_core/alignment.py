"""Plain DPO and SFT on preference pairs: how a model gets aligned to an old policy in the first place.

TRACE starts from a model that was preference-aligned under an old policy. The demo needs such a
model: SmolLM2-135M-Instruct itself was never trained on the demo's old preference set, so it
does not refuse what the old policy refused. :func:`sft_align` (what the demo's prepared model
uses) and :func:`dpo_align` make that old-aligned model from the old pairs with LoRA, then fold
the adapter into the weights so the result is an ordinary model folder that TRACE can take as
``M_ref``.

DPO is also the "naive relabelling" baseline of arXiv 2511.02623's experiments when the pairs have
been relabelled under the new policy first. It reuses the TRACE trainer: every pair is one PREFER
sample with weight 1 (``weight_normalization="mean"``) and no RETAIN term.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from transformers import Trainer

from trace_realign.core.config import AlignmentConfig, DpoConfig, TrainerConfig, TrainingConfig
from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import TraceError
from trace_realign.core.impact import reference_logps
from trace_realign.core.modeling import add_lora
from trace_realign.core.objective import Sample, SampleKind
from trace_realign.core.logprobs import response_tokens
from trace_realign.core.tokenization import Encoder, SequenceBatch, pad_sequences
from trace_realign.core.training import train, training_arguments


@dataclass
class AlignmentResult:
    """What an alignment run did: optimizer steps, pairs trained on, and the trainer's log."""

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
    config: DpoConfig,
    work_dir: str | Path,
    *,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
):
    """DPO-train ``model`` on ``pairs`` with a fresh LoRA adapter; return (merged model, result).

    ``model`` is the base model (its weights are the DPO reference). The returned model is the
    base with the trained adapter merged in: a plain transformers model to ``save_pretrained``.
    ``work_dir`` receives the trainer's scratch output (no checkpoints are written); ``seed`` draws
    the adapter and orders the data; ``progress(stage, done, total)`` follows the reference pass
    (and shows the trainer's progress bar). Raises TraceError for no pairs.
    """
    if not pairs:
        raise TraceError("dpo: no preference pairs")
    encoder = Encoder(tokenizer, max_length=config.max_length)
    peft_model = add_lora(model, config.lora, seed=seed)
    samples = dpo_samples(pairs, encoder)
    # LoRA B starts at 0, so the adapted model is the reference here: one no-grad pass gives
    # every reference log-prob the loss needs.
    done = [0]

    def step(n):
        done[0] += n
        if progress:
            progress("reference", done[0], len(samples))

    ref = reference_logps(peft_model, samples, tokenizer.pad_token_id, config.reference_batch_size, step)
    samples = [replace(s, weight=1.0 / len(samples), ref_logps=(float(ref[i, 0]), float(ref[i, 1]))) for i, s in enumerate(samples)]
    result = train(peft_model, tokenizer, samples, _as_trace_training(config), work_dir, seed=seed, progress=progress is not None)
    return _merged(peft_model, result.global_step, len(pairs), result.log_history)


def _as_trace_training(config: DpoConfig) -> TrainingConfig:
    """A DPO run as TRACE training: PREFER samples only, each weight 1/N scaled by N (every pair
    counts 1, as in DPO), no KL term."""
    trainer = config.model_dump(include=set(TrainerConfig.model_fields))
    return TrainingConfig(
        **trainer, lora=config.lora, max_length=config.max_length, beta=config.beta,
        alpha_kl=0.0, use_kl=False, weight_normalization="mean",
    )


def _merged(peft_model, global_step: int, n_pairs: int, log_history: list[dict]):
    """Fold the trained adapter into the weights; (plain model in eval mode, result)."""
    logged = [h for h in log_history if "loss" in h]
    final = {k: v for k, v in (logged[-1] if logged else {}).items() if isinstance(v, (int, float))}
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, AlignmentResult(global_step, n_pairs, list(log_history), final)


class _SftCollator:
    """Right-padded (prompt, response) sequences with labels on the response tokens only.

    ``labels`` is what the Trainer counts the batch's target tokens from (``num_items_in_batch``);
    the loss itself reads ``response_mask``.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, sequences):
        batch = pad_sequences(sequences, self.pad_token_id)
        labels = batch.input_ids.masked_fill(batch.response_mask == 0, -100)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "response_mask": batch.response_mask, "labels": labels}


class SftTrainer(Trainer):
    """The causal-LM cross-entropy of the response tokens, with the LM head run at those tokens only.

    The loss is the model's own ``labels`` loss (transformers' ``ForCausalLMLoss``): the summed
    negative log-likelihood of the M response tokens divided by ``num_items_in_batch`` (the
    target tokens of every micro-batch of the optimizer step) where the Trainer passes it, else
    by M; multiplied by the number of processes under ``average_tokens_across_devices``, as the
    Trainer does for a model's loss. No ``[N, T, V]`` logits are formed
    (:func:`~trace_realign.core.logprobs.response_tokens`).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = SequenceBatch(inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"])  # [N, T] each
        tokens = response_tokens(model, batch)
        nll = -tokens.token_logps().sum()  # []
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = nll / max(1, tokens.targets.numel())
        return (loss, {"loss": loss}) if return_outputs else loss


def sft_align(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    config: AlignmentConfig,
    work_dir: str | Path,
    *,
    seed: int = 0,
):
    """Supervised fine-tuning on the chosen responses (LoRA, merged): the cheaper way to make a
    model follow the policy that chose them (one sequence per pair, no reference pass).

    The loss is the mean token cross-entropy of the chosen responses (prompt tokens masked), with
    the LM head at the response tokens only (:class:`SftTrainer`). ``seed`` draws the adapter and orders the data. Returns (merged model, result); raises
    TraceError for no pairs.
    """
    if not pairs:
        raise TraceError("sft: no preference pairs")
    encoder = Encoder(tokenizer, max_length=config.max_length)
    sequences = [encoder.sequence(p.prompt, p.chosen) for p in pairs]  # the data set: a list
    peft_model = add_lora(model, config.lora, seed=seed)
    args = training_arguments(config, work_dir, seed=seed, progress=False)
    trainer = SftTrainer(model=peft_model, args=args, train_dataset=sequences, data_collator=_SftCollator(tokenizer.pad_token_id))
    trainer.train()
    return _merged(peft_model, trainer.state.global_step, len(pairs), trainer.state.log_history)
