"""Weighted TRACE training on top of transformers' Trainer.

The Trainer brings what it already does well: optimizer and schedule, gradient accumulation,
gradient checkpointing, bf16, checkpoints that resume exactly (optimizer, scheduler, RNG, data
position) and ``accelerate launch`` with DDP or FSDP. :class:`TraceTrainer` overrides the loss
only, with the TRACE objective (arXiv 2511.02623, stage 3, the hybrid objective):

``loss = (sum_{conflict} w_i L_i + alpha_KL * sum_{retain} KL_i) / batch_size``

Reference log-probs of the conflict samples come precomputed from the reference stage. The
RETAIN KL needs the reference's full next-token distributions, so those come from a no-grad
forward of the same model with its LoRA adapter disabled (one copy of the weights), or of a
frozen copy under full fine-tuning.

Weights: the reference stage gives ``w_i = max(0, s_i) / sum_k max(0, s_k)`` over all conflict
samples (arXiv 2511.02623, stage 2, the alignment impact score). ``weight_normalization="mean"`` (default) multiplies
them by the number of conflict samples, so they average 1 and the conflict terms keep DPO's
per-sample scale next to the KL term (the no-weighting ablation, all ``w_i = 1``, is then directly
comparable); ``"sum"`` uses them as they are, as the authors' code does.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from trace_realign.core.config import TrainerConfig, TrainingConfig
from trace_realign.core.distributed import Launch, RankJob, rank_device, run_job
from trace_realign.core.errors import TraceError
from trace_realign.core.logprobs import response_tokens
from trace_realign.core.losses import token_kl
from trace_realign.core.modeling import frozen_reference, is_peft, load_tokenizer, resolve_device, save_adapter, trainable_model
from trace_realign.core.objective import PunishForm, Sample, SampleKind, conflict_losses, flatten_sequences, gather_pairs
from trace_realign.core.tokenization import SequenceBatch, pad_sequences

SAVE_TOTAL_LIMIT = 2
"""Checkpoints kept while training: the last one to resume from, and the one before it."""

COMPONENTS = ("prefer_loss", "punish_loss", "negate_loss", "prefer_margin", "punish_logratio", "retain_kl")
"""The parts of the loss logged next to it: each the mean over the batches (of every process) since the last log."""


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
            "confidences": torch.tensor([s.confidence for s in samples], dtype=torch.float32),
        }


class FailAtStep(TrainerCallback):
    """The ``fail_at_step`` test switch: raise once the checkpoint of that global step is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise InjectedFailure(f"injected training failure at step {state.global_step} (training.fail_at_step)")


class TraceTrainer(Trainer):
    """A transformers ``Trainer`` whose loss is the weighted TRACE objective over mixed batches.

    ``beta``, ``alpha_kl``, ``punish_form`` and ``robust_epsilon`` (None: DPO for PREFER samples;
    a flip rate: Robust DPO, the robust_dpo baseline) are the loss's parameters (:class:`TrainingConfig`);
    ``ref_model`` is the frozen reference under full fine-tuning (None: a LoRA model is its own
    reference with the adapter disabled). The parts of the loss are added to the logged values.
    """

    def __init__(
        self, *args, beta: float, alpha_kl: float, punish_form: PunishForm, robust_epsilon: float | None = None, ref_model=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.alpha_kl = alpha_kl
        self.punish_form = punish_form
        self.robust_epsilon = robust_epsilon
        self.ref_model = ref_model
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let Trainer divide by GA steps
        self._components: dict[str, list[float]] = defaultdict(list)
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @contextlib.contextmanager
    def _reference(self, model):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            # The unwrapped model: a DDP wrapper's forward is a collective (it broadcasts buffers), and
            # only the processes whose batch holds RETAIN samples run this forward.
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():
                yield unwrapped

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``(sum_{conflict} w_i L_i + alpha_KL * sum_{retain} c_i KL_i) / S`` over the batch's S samples
        (``c_i``: the RETAIN sample's confidence factor, 1 without ``weights.confidence``),
        whose R sequences (one or two per sample) run in one forward of width T.

        The LM head runs only at the M response tokens (:func:`~trace_realign.core.logprobs.response_tokens`);
        full next-token distributions [M_K, V] are formed only for the RETAIN rows' M_K response tokens.
        """
        batch = SequenceBatch(inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"])  # [R, T] each
        kinds, weights = inputs["kinds"], inputs["weights"]  # [S], [S]
        n = kinds.shape[0]
        tokens = response_tokens(model, batch)  # M response tokens of the R rows
        policy = gather_pairs(tokens.sequence_logps(), inputs["row_sample"], inputs["row_slot"], n)  # [S, 2]
        conflict = conflict_losses(kinds, policy, inputs["ref_logps"], self.beta, self.punish_form, self.robust_epsilon)  # [S], 0 for RETAIN
        total = (weights * conflict).sum()  # []
        retain_rows = (kinds[inputs["row_sample"]] == SampleKind.RETAIN).nonzero().squeeze(-1)  # [K] rows of RETAIN samples
        kl = None
        if retain_rows.numel() and self.alpha_kl > 0:
            width = int(batch.attention_mask[retain_rows].sum(-1).max())  # W <= T: the longest RETAIN row
            sub = SequenceBatch(
                batch.input_ids[retain_rows, :width],  # [K, W]
                batch.attention_mask[retain_rows, :width],  # [K, W]
                batch.response_mask[retain_rows, :width],  # [K, W]
            )
            with torch.no_grad(), self._reference(model) as ref:
                ref_tokens = response_tokens(ref, sub)  # the same M_K tokens, rows 0..K-1, in the same order
                ref_logits = ref_tokens.logits()  # [M_K, V]
            policy_logits = tokens.logits(torch.isin(tokens.rows, retain_rows))  # [M_K, V]
            kl = ref_tokens.row_means(token_kl(ref_logits, policy_logits))  # [K]: mean KL over each RETAIN row's tokens
            c = inputs["confidences"][inputs["row_sample"][retain_rows]]  # [K]: c_i of weights.confidence (1: off)
            total = total + self.alpha_kl * (c * kl).sum()  # []
        self._record(kinds, policy.detach(), inputs["ref_logps"], conflict.detach(), kl)
        loss = total / n  # []
        return (loss, {"policy_logps": policy}) if return_outputs else loss

    def _record(self, kinds, policy, ref, conflict, kl):
        r = policy - ref  # [S, 2]: log-ratios r(y) of each sample's sequences
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
            # [C, 2]: sum and count of each component's batch means; summed over the processes,
            # which all log at the same steps.
            totals = torch.tensor([[sum(self._components[k]), len(self._components[k])] for k in COMPONENTS], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), "sum").cpu()
            for k, (total, count) in zip(COMPONENTS, totals.tolist()):
                if count:
                    logs[k] = total / count
            self._components.clear()
        super().log(logs, *args, **kwargs)


@dataclass
class TrainResult:
    global_step: int
    log_history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def weight_scale(samples: Sequence[Sample], normalization: str) -> float:
    """The factor applied to the method's sum-normalised weights during training: 1 for ``"sum"``,
    the number of conflict samples for ``"mean"``."""
    if normalization == "sum":
        return 1.0
    return float(max(1, sum(1 for s in samples if s.kind != SampleKind.RETAIN)))


def require_samples(samples: Sequence[Sample]) -> None:
    """Raise TraceError when there is nothing to train on."""
    if not samples:
        raise TraceError("training: no samples to train on (every pair was UNKNOWN or filtered out)")


def training_arguments(
    trainer: TrainerConfig, output_dir: str | Path, *, seed: int = 0, progress: bool = True, use_cpu: bool = False
) -> TrainingArguments:
    """The transformers ``TrainingArguments`` of ``trainer`` (shared by every trainer here).

    ``seed`` seeds the Trainer's RNG and data order; ``progress`` shows its progress bar;
    ``use_cpu`` trains on the CPU even where a GPU is visible (and makes the ranks of a launcher
    on CPUs one gloo process group: without it the Trainer runs each rank alone).
    Checkpoints are written every ``save_steps`` (0: none), the last :data:`SAVE_TOTAL_LIMIT` kept.
    """
    save = trainer.save_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=trainer.per_device_batch_size,
        gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        learning_rate=trainer.learning_rate,
        lr_scheduler_type=trainer.lr_scheduler,
        warmup_steps=trainer.warmup_steps,
        num_train_epochs=trainer.num_train_epochs,
        max_steps=trainer.max_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=trainer.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=trainer.save_steps if save else 500,
        save_total_limit=SAVE_TOTAL_LIMIT,
        seed=seed,
        data_seed=seed,
        bf16=trainer.bf16,
        gradient_checkpointing=trainer.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if trainer.gradient_checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=use_cpu,
    )


def train(
    model,
    tokenizer,
    samples: Sequence[Sample],
    training: TrainingConfig,
    output_dir: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    fail_at_step: int | None = None,
    ref_model=None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: Sequence = (),
) -> TrainResult:
    """Train ``model`` on ``samples`` with the TRACE objective of ``training``.

    ``model`` is a LoRA model from the initial adapter, or a full model with ``ref_model`` its
    frozen reference copy. Samples carry their weights (summing to 1 over conflict samples) and
    reference log-probs from the reference stage. ``output_dir`` receives the checkpoints;
    ``fail_at_step`` is the test switch that raises :class:`InjectedFailure` after that step's
    checkpoint. Raises TraceError for no samples, or RETAIN samples under full fine-tuning without
    ``ref_model``.
    """
    require_samples(samples)
    if not is_peft(model) and ref_model is None and any(s.kind == SampleKind.RETAIN for s in samples):
        raise TraceError("training: full fine-tuning needs a frozen reference model for the RETAIN KL")
    dataset = SampleDataset(samples, weight_scale(samples, training.weight_normalization))
    trainer = TraceTrainer(
        model=model,
        args=training_arguments(training, output_dir, seed=seed, progress=progress, use_cpu=next(model.parameters()).device.type == "cpu"),
        train_dataset=dataset,
        data_collator=SampleCollator(dataset, tokenizer.pad_token_id),
        processing_class=tokenizer,
        beta=training.beta,
        alpha_kl=training.alpha_kl,
        punish_form=training.punish_form,
        robust_epsilon=training.robust_epsilon if training.method == "robust_dpo" else None,
        ref_model=ref_model,
        callbacks=[*callbacks, *([FailAtStep(fail_at_step)] if fail_at_step is not None else [])],
    )
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return TrainResult(trainer.state.global_step, list(trainer.state.log_history), dict(output.metrics))


@dataclass(frozen=True)
class TrainJob:
    """A training run as one process (or each of several) starts it: the model folder
    ``model_path`` loaded in ``dtype`` on ``device`` (a ``model.device`` setting), with the initial
    LoRA ``adapter`` (None under full fine-tuning), trained by ``training`` (a
    :class:`TrainingConfig` as JSON) with ``seed`` into ``output_dir`` (checkpoints; the model in
    ``output_dir/final``), from its last checkpoint when ``resume``. ``fail_at_step`` is the crash
    test switch of :func:`train`; ``progress`` shows progress bars and the ranks' output."""

    model_path: str
    training: dict
    output_dir: str
    dtype: str = "float32"
    device: str = "auto"
    adapter: str | None = None
    seed: int = 0
    progress: bool = True
    fail_at_step: int | None = None
    resume: bool = False

    @property
    def final_dir(self) -> Path:
        return Path(self.output_dir) / "final"


@dataclass
class TrainOutput:
    """What a training run gives back: its :class:`TrainResult` and the saved folders
    (:func:`save_output`'s ``{"adapter": path, ...}``)."""

    result: TrainResult
    paths: dict[str, str]


def fit(job: TrainJob, samples: Sequence[Sample], *, device: str | None = None, save: bool = True) -> TrainOutput:
    """Load the model of ``job`` on ``device`` (default: ``job.device`` resolved), train it on
    ``samples`` (:func:`train`) and, with ``save``, save it to ``job.final_dir``
    (:func:`save_output`; every process but the first of a multi-process run passes False).
    Raises what :func:`train` and the model loading raise."""
    training = TrainingConfig.model_validate(job.training)
    device = device or resolve_device(job.device)
    tokenizer = load_tokenizer(job.model_path)
    model = trainable_model(job.model_path, training, dtype=job.dtype, device=device, seed=job.seed, adapter=job.adapter)
    ref_model = frozen_reference(job.model_path, training.full_finetune, dtype=job.dtype, device=device)
    result = train(
        model, tokenizer, samples, training, job.output_dir, seed=job.seed, progress=job.progress,
        fail_at_step=job.fail_at_step, ref_model=ref_model, resume_from_checkpoint=True if job.resume else None,
    )  # fmt: skip
    paths = save_output(model, tokenizer, job.final_dir, merge=training.merge) if save else {}
    return TrainOutput(result, paths)


def train_rank(rank_job: RankJob) -> None:
    """One rank of a multi-process training (:data:`~trace_realign.core.distributed.JOBS`): the same
    :func:`fit` on this rank's device; rank 0 saves the model and writes ``result.json``."""
    job = TrainJob(**rank_job.spec["job"])
    out = fit(job, rank_job.payload(), device=rank_device(job.device), save=rank_job.is_main)
    if rank_job.is_main:
        data = {"result": asdict(out.result), "paths": out.paths}
        (rank_job.folder / "result.json").write_text(json.dumps(data, default=str), encoding="utf-8")


def run_training(job: TrainJob, samples: Sequence[Sample], *, timeout: float | None = None) -> TrainOutput:
    """Train as ``job`` asks, on ``training.num_processes`` processes: in this process when 1 (:func:`fit`),
    else as a subprocess under the launcher of :meth:`Launch.of` whose ranks each run :func:`fit`
    (the job folder, with the ranks' log ``ranks.log``, is ``output_dir/launch``; ``timeout`` in
    seconds bounds it). Per-device batches are split over the processes: each takes every
    ``num_processes``-th batch of the same seeded order, so one process with
    ``per_device_batch_size x num_processes`` trains on the same global batches. Raises
    TraceError for no samples before any process starts, and
    :class:`~trace_realign.core.distributed.RankFailed` (stage ``train``, the failing rank and its
    last error) when a rank fails."""
    training = TrainingConfig.model_validate(job.training)
    if training.num_processes == 1:
        return fit(job, samples)
    require_samples(samples)
    launch = Launch.of(training)
    folder = run_job(
        "train", {"job": asdict(job)}, list(samples), Path(job.output_dir) / "launch", launch,
        stage="train", echo=job.progress, timeout=timeout,
    )  # fmt: skip
    data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    return TrainOutput(TrainResult(**data["result"]), data["paths"])


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

