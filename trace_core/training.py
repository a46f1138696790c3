"""Weighted TRACE training on top of transformers' Trainer.

The Trainer brings what it already does well: optimizer and schedule, gradient accumulation,
gradient checkpointing, bf16, checkpoints that resume exactly (optimizer, scheduler, RNG, data
position) and ``accelerate launch`` with DDP or FSDP. This module adds the TRACE objective:

``loss = (sum_{conflict} w_i L_i + alpha_KL * sum_{retain} KL_i) / batch_size``

Reference log-probs of the conflict samples come precomputed from the reference stage. The
RETAIN KL needs the reference's full next-token distributions, so those come from a no-grad
forward of the same model with its LoRA adapter disabled (one copy of the weights), or of a
frozen copy under full fine-tuning.

Weights: the reference stage gives ``w_i`` normalised to sum 1 over all conflict samples
(method.md). ``weight_normalization="mean"`` (default) multiplies them by the number of conflict
samples, so they average 1 and the conflict terms keep DPO's per-sample scale next to the KL
term (the no-weighting ablation, all ``w_i = 1``, is then directly comparable); ``"sum"`` uses
them as they are, as the authors' code does.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

from trace_realign.core.errors import TraceError
from trace_realign.core.logprobs import forward_logits, response_logps
from trace_realign.core.losses import retain_kl
from trace_realign.core.modeling import is_peft, save_adapter
from trace_realign.core.objective import PunishForm, Sample, SampleKind, conflict_losses, flatten_sequences, gather_pairs
from trace_realign.core.tokenization import SequenceBatch, pad_sequences


@dataclass
class TrainSettings:
    """Training settings; defaults are the authors' (method.md) where they gave one."""

    beta: float = 0.3
    alpha_kl: float = 0.1
    punish_form: PunishForm = "trace"
    weight_normalization: Literal["mean", "sum"] = "mean"
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 100
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    disable_tqdm: bool = False
    fail_at_step: int | None = None
    """Test switch: raise after the checkpoint of this global step is saved (simulates a crash)."""


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_at_step`` test switch."""


class SampleDataset(Dataset):
    """Samples as Trainer items; the collator turns a list of them into one mixed batch."""

    def __init__(self, samples: Sequence[Sample], scale: float = 1.0):
        self.samples = list(samples)
        self.scale = scale

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {"index": i}


class SampleCollator:
    """Flattens the sequences of a batch of samples into one right-padded forward batch."""

    def __init__(self, dataset: SampleDataset, pad_token_id: int):
        self.dataset = dataset
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        samples = [self.dataset.samples[it["index"]] for it in items]
        sequences, row_sample, row_slot = flatten_sequences(samples)
        batch = pad_sequences(sequences, self.pad_token_id)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "response_mask": batch.response_mask,
            "row_sample": row_sample,
            "row_slot": row_slot,
            "kinds": torch.tensor([int(s.kind) for s in samples], dtype=torch.long),
            "weights": torch.tensor([s.weight * self.dataset.scale for s in samples], dtype=torch.float32),
            "ref_logps": torch.tensor([list(s.ref_logps) for s in samples], dtype=torch.float32),
        }


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class FailAtStep(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                raise InjectedFailure(f"injected training failure at step {state.global_step} (training.fail_at_step)")

    class TraceTrainer(Trainer):
        """Trainer whose loss is the weighted TRACE objective over mixed batches."""

        def __init__(self, *args, settings: TrainSettings, ref_model=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.settings = settings
            self.ref_model = ref_model
            self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let Trainer divide by GA steps
            self._components: dict[str, list[float]] = defaultdict(list)
            if ref_model is not None:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            if settings.fail_at_step is not None:
                self.add_callback(FailAtStep(settings.fail_at_step))

        @contextlib.contextmanager
        def _reference(self, model):
            if self.ref_model is not None:
                yield self.ref_model
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    yield model

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            s = self.settings
            batch = SequenceBatch(inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"])
            kinds, weights = inputs["kinds"], inputs["weights"]
            n = kinds.shape[0]
            logits = forward_logits(model, batch)
            policy = gather_pairs(response_logps(logits, batch), inputs["row_sample"], inputs["row_slot"], n)
            conflict = conflict_losses(kinds, policy, inputs["ref_logps"], s.beta, s.punish_form)
            total = (weights * conflict).sum()
            retain_rows = (kinds[inputs["row_sample"]] == SampleKind.RETAIN).nonzero().squeeze(-1)
            kl = None
            if retain_rows.numel() and s.alpha_kl > 0:
                width = int(batch.attention_mask[retain_rows].sum(-1).max())
                sub = SequenceBatch(
                    batch.input_ids[retain_rows, :width],
                    batch.attention_mask[retain_rows, :width],
                    batch.response_mask[retain_rows, :width],
                )
                with torch.no_grad(), self._reference(model) as ref:
                    ref_logits = forward_logits(ref, sub)
                kl = retain_kl(ref_logits[:, :-1], logits[retain_rows, : width - 1], sub.response_mask[:, 1:])
                total = total + s.alpha_kl * kl.sum()
            self._record(kinds, policy.detach(), inputs["ref_logps"], conflict.detach(), kl)
            loss = total / n
            return (loss, {"logits": logits}) if return_outputs else loss

        def _record(self, kinds, policy, ref, conflict, kl):
            r = policy - ref
            for kind, name in ((SampleKind.PREFER, "prefer"), (SampleKind.PUNISH, "punish"), (SampleKind.NEGATE, "negate")):
                sel = kinds == kind
                if sel.any():
                    self._components[f"{name}_loss"].append(conflict[sel].mean().item())
            sel = kinds == SampleKind.PREFER
            if sel.any():
                self._components["prefer_margin"].append((r[sel, 0] - r[sel, 1]).mean().item())
            sel = kinds == SampleKind.PUNISH
            if sel.any():
                self._components["punish_logratio"].append(r[sel].mean().item())
            if kl is not None:
                self._components["retain_kl"].append(kl.mean().item())

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                for k, v in self._components.items():
                    if v:
                        logs[k] = sum(v) / len(v)
                self._components.clear()
            super().log(logs, *args, **kwargs)

    return TraceTrainer


@dataclass
class TrainResult:
    global_step: int
    log_history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def weight_scale(samples: Sequence[Sample], normalization: str) -> float:
    """The factor applied to the method's sum-normalised weights during training."""
    if normalization == "sum":
        return 1.0
    if normalization == "mean":
        return float(max(1, sum(1 for s in samples if s.kind != SampleKind.RETAIN)))
    raise TraceError(f"training.weight_normalization: unknown value '{normalization}' (use mean or sum)")


def training_arguments(settings: TrainSettings, output_dir: str | Path):
    """The transformers ``TrainingArguments`` for ``settings`` (shared by every trainer here)."""
    from transformers import TrainingArguments

    save = settings.save_steps and settings.save_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=max(1, settings.logging_steps),
        save_strategy="steps" if save else "no",
        save_steps=settings.save_steps if save else 500,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=settings.disable_tqdm,
    )


def train(
    model,
    tokenizer,
    samples: Sequence[Sample],
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    ref_model=None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: Sequence = (),
) -> TrainResult:
    """Train ``model`` (a LoRA model from the initial adapter, or a full model with ``ref_model``)."""
    if not samples:
        raise TraceError("training: no samples to train on (every pair was UNKNOWN or filtered out)")
    if not is_peft(model) and ref_model is None and any(s.kind == SampleKind.RETAIN for s in samples):
        raise TraceError("training: full fine-tuning needs a frozen reference model for the RETAIN KL")
    if settings.punish_form not in ("trace", "npo"):
        raise TraceError(f"training.punish_form: unknown value '{settings.punish_form}' (use trace or npo)")
    dataset = SampleDataset(samples, weight_scale(samples, settings.weight_normalization))
    args = training_arguments(settings, output_dir)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SampleCollator(dataset, tokenizer.pad_token_id),
        processing_class=tokenizer,
        settings=settings,
        ref_model=ref_model,
        callbacks=list(callbacks),
    )
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return TrainResult(trainer.state.global_step, list(trainer.state.log_history), dict(output.metrics))


def save_output(model, tokenizer, output_dir: str | Path, merge: bool = False) -> dict[str, str]:
    """Save the realigned model as Hugging Face folders that transformers loads back.

    LoRA: ``adapter/`` (PEFT adapter + tokenizer) and, with ``merge``, ``merged/`` (full weights).
    Full fine-tuning: ``model/``.
    """
    out = Path(output_dir)
    paths = {}
    if is_peft(model):
        save_adapter(model, out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        paths["adapter"] = str(out / "adapter")
        if merge:
            # merge_and_unload folds the adapter into the base weights in place: do it last.
            merged = model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
            paths["merged"] = str(out / "merged")
    else:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        paths["model"] = str(out / "model")
    return paths

