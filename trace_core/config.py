"""The settings of the TRACE method, one validated pydantic model per section.

Every section forbids unknown keys, so a misspelt setting is rejected with its full name
(``training.lerning_rate``) instead of silently taking a default. Settings that name local files
carry :data:`LOCAL_PATH` or :data:`~trace_realign.core.oracle.config.INPUT_FILE` in their field's
``json_schema_extra`` (:func:`marked_settings` finds them). The pipeline's file, with its run and
MLflow sections, is read by :mod:`trace_realign.flows.config`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trace_realign.core.oracle.config import INPUT_FILE, JudgeConfig
from trace_realign.core.resources import SHIPPED_ROOT




class Section(BaseModel):
    """A settings section: unknown keys are rejected by name."""

    model_config = ConfigDict(extra="forbid")


LOCAL_PATH = {"local_path": True}
"""Marks a setting that may name a local file or folder (resolved beside the config file first);
:data:`INPUT_FILE` settings are local paths too."""


class ModelConfig(Section):
    """The aligned model ``M_ref`` that is realigned."""

    path: str = Field(
        description="a known name (smollm2-135m-instruct, smollm2-135m-instruct-old-policy, tiny-random) or a local model folder",
        json_schema_extra=LOCAL_PATH,
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="float32 or bfloat16: the weights' dtype when loaded")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1")


class DataConfig(Section):
    """The old preference pairs ``D = {(x, y_w, y_l)}``."""

    path: str = Field(description="a data file or folder, or a Hugging Face hub data set name", json_schema_extra=LOCAL_PATH)
    format: Literal["jsonl", "json", "csv", "parquet", "hf"] | None = Field(None, description="jsonl, json, csv, parquet or hf; default: from the file ending")
    split: str = Field("train", description="the split of a hub data set")
    config_name: str | None = Field(None, description="the configuration of a hub data set")
    columns: dict[str, str] = Field(default_factory=dict, description="schema name -> source column")
    adapter: Literal["pairs", "pku_saferlhf"] = Field("pairs", description="how rows become pairs: pairs (prompt, chosen, rejected) or pku_saferlhf")
    on_invalid: Literal["error", "skip"] = Field("error", description="a bad row stops the run (error) or is skipped and counted (skip)")
    limit: int | None = Field(None, ge=1, description="use only the first this many pairs")
    shard_size: int = Field(256, ge=1, description="pairs per judging shard: a crash loses at most one shard's requests in flight")


class PolicyConfig(Section):
    """The new policy ``pi_new``."""

    path: str = Field(
        description="a Markdown policy with optional YAML front matter (name, version, rules for the annotations judge)",
        json_schema_extra=LOCAL_PATH,
    )
    previous: str | None = Field(
        None,
        description="the policy the model and pairs were aligned under: a run also judges the pairs under it and "
        "reports the policy diff (trace-realign diff --against sets it)",
        json_schema_extra=LOCAL_PATH,
    )


class OracleNoiseConfig(Section):
    """Oracle noise for the robustness study of arXiv 2511.02623: a seeded share of the oracle's
    verdicts corrupted before triage (:func:`trace_realign.core.triage.apply_oracle_noise`)."""

    rate: float = Field(ge=0, le=1, description="share of the pairs with known verdicts that are corrupted (exactly round(rate * n))")
    mode: Literal["flip", "swap", "mixed"] = Field(
        "mixed", description="flip: triage type reassigned; swap: the pair's two verdicts exchanged; mixed: either, 1/2 each (the authors')"
    )
    seed: int = Field(0, description="seed of which pairs are drawn and how each is corrupted")


class TriageConfig(Section):
    """Triage (arXiv 2511.02623, stage 1: every pair is INVERT, PUNISH or RETAIN under the new policy)."""

    corrections: bool = Field(False, description="PUNISH pairs train an oracle-written correction over y_w")
    use_triage: bool = Field(True, description="false: the no-triage ablation (NPO on the rejected response of every relabelled pair: the old winner of an INVERT pair, the old loser of the others)")
    noise: OracleNoiseConfig | None = Field(
        None,
        description="oracle noise before triage, {rate, mode: flip|swap|mixed, seed}; the verdict cache and gold labels are never touched",
    )
    gold_labels_path: str | None = Field(
        None,
        description="gold labels for gold_dpo (JSONL: prompt, response, compliant under the new policy); "
        "default: the data's annotations under the policy's rules",
        json_schema_extra=INPUT_FILE,
    )
    min_confidence: float | None = Field(
        None,
        gt=0,
        le=1,
        description="a verdict whose confidence is below this counts as unknown in triage (or is asked again of "
        "oracle.fallback when set); a verdict without a confidence (the annotations judge) is never routed; null: off",
    )


class WeightsConfig(Section):
    """Impact weighting (arXiv 2511.02623, stage 2: the alignment impact score against a gold batch)."""

    enabled: bool = Field(True, description="false: the no-impact-weighting ablation (all w_i = 1)")
    gold_size: int = Field(64, ge=1, description="pairs in the gold batch D_gold drawn from the training data")
    gold_path: str | None = Field(
        None, description="your own gold pairs (prompt, preferred, dispreferred)", json_schema_extra=INPUT_FILE
    )
    batch_size: int = Field(8, ge=1, description="pairs per scoring batch")
    confidence: bool = Field(
        False,
        description="scale each sample by the confidence of the verdicts that made its type (INVERT, PUNISH: the "
        "product of both; RETAIN: the chosen's KL term; a verdict without one counts 1), before normalising",
    )


class LoraConfig(Section):
    """A LoRA adapter (PEFT). Defaults: the authors' settings (arXiv 2511.02623, experimental setup)."""

    r: int = Field(32, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="lora_alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="the linear layers that get an adapter"
    )


class TrainerConfig(Section):
    """Optimisation settings, mapped one to one onto transformers' ``TrainingArguments``
    (:func:`trace_realign.core.training.training_arguments`)."""

    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="a transformers scheduler name (cosine, linear, constant, ...)")
    warmup_steps: int = Field(100, ge=0, description="optimizer steps of linear warm-up")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the samples (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps to run; -1: num_train_epochs decides")
    per_device_batch_size: int = Field(1, ge=1, description="samples per device per forward")
    gradient_accumulation_steps: int = Field(4, ge=1, description="forwards per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward (less memory, slower)")
    bf16: bool = Field(False, description="bfloat16 mixed precision")
    logging_steps: int = Field(10, ge=1, description="optimizer steps between logged losses")
    save_steps: int = Field(0, ge=0, description="optimizer steps between resumable checkpoints; 0: none")


class ReferenceTrainingConfig(Section):
    """The training settings the reference stage reads: how samples are encoded, which model is
    trainable, and the loss parameters the impact scores and reference log-probs depend on.
    Every other training setting leaves the reference stage's result (and cache key) unchanged."""

    full_finetune: bool = Field(False, description="train every weight (a frozen copy is the reference) instead of a LoRA adapter")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the LoRA adapter (ignored under full_finetune)")
    max_length: int = Field(256, ge=8, description="tokens per sequence, prompt and response together")
    max_prompt_length: int | None = Field(None, ge=1, description="tokens of the prompt, below max_length; default: half of max_length")
    beta: float = Field(0.3, gt=0, description="inverse temperature of the DPO and NPO terms, in scoring and training")
    punish_form: Literal["trace", "npo"] = Field(
        "trace", description="PUNISH loss: trace (the authors' dual form) or npo (NPO's 2/beta scale, arXiv 2404.05868)"
    )
    use_kl: bool = Field(True, description="false: the no-KL ablation (no RETAIN samples)")
    method: Literal["trace", "naive_relabel_dpo", "robust_dpo", "npo", "gold_dpo"] = Field(
        "trace",
        description="the objective: trace; naive_relabel_dpo (DPO on the relabelled INVERT and RETAIN pairs, PUNISH dropped); "
        "robust_dpo (the same pairs, Robust DPO with robust_epsilon); npo (NPO on every response the oracle found violating); "
        "gold_dpo (DPO on the pairs relabelled by the gold labels, triage.gold_labels_path, instead of the oracle). "
        "The baselines train with uniform weights and no RETAIN term",
    )
    robust_epsilon: float = Field(0.1, ge=0, lt=0.5, description="robust_dpo's assumed label-flip rate (arXiv 2403.00409)")
    num_processes: int = Field(
        1,
        ge=1,
        description="processes the train stage's training and the reference stage's impact scores run on; "
        "above 1 each stage starts them as a subprocess under training.launcher (global batch: "
        "per_device_batch_size x gradient_accumulation_steps x num_processes)",
    )
    launcher: Literal["auto", "torchrun", "accelerate"] = Field(
        "auto",
        description="what starts more than one process: accelerate (accelerate launch with accelerate_config, "
        "NCCL on GPUs), torchrun (gloo on CPUs), auto (accelerate where a GPU is visible, else torchrun)",
    )
    accelerate_config: str | None = Field(
        None,
        description="the accelerate config file of the accelerate launcher; default: the shipped DDP config "
        "(configs/accelerate/ddp.yaml; fsdp.yaml beside it)",
        json_schema_extra=LOCAL_PATH,
    )

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        return self


class TrainingConfig(ReferenceTrainingConfig, TrainerConfig):
    """Weighted TRACE training: ``L = sum_{conflict} w_i L_i + alpha_KL sum_{retain} KL_i``
    (arXiv 2511.02623, stage 3, the hybrid objective). Defaults: the authors' settings where they
    gave one."""

    alpha_kl: float = Field(0.1, ge=0, description="weight alpha_KL of the RETAIN KL term")
    weight_normalization: Literal["mean", "sum"] = Field(
        "mean", description="mean: w_i scaled to average 1 (DPO's per-sample scale); sum: w_i sum to 1, as the authors' code"
    )
    merge: bool = Field(False, description="also save merged full weights next to the adapter")
    fail_at_step: int | None = Field(None, ge=1, description="test switch: crash after this step's checkpoint (a run switch: in no cache key, passed to train() as fail_at_step)")

    @model_validator(mode="after")
    def _crash_after_a_checkpoint(self):
        if self.fail_at_step is not None and self.save_steps == 0:
            raise ValueError(
                "fail_at_step needs save_steps > 0 (the crash is raised after a checkpoint is saved)"
            )
        return self

    def reference_view(self) -> ReferenceTrainingConfig:
        """The settings the reference stage reads (its cache key holds only these)."""
        return ReferenceTrainingConfig.model_validate(self.model_dump(include=set(ReferenceTrainingConfig.model_fields)))


class AlignmentConfig(TrainerConfig):
    """Supervised fine-tuning on the chosen responses (LoRA, merged): how the demo's old-policy
    model is made (:func:`trace_realign.core.alignment.sft_align`). Not part of the pipeline config."""

    max_length: int = Field(192, ge=8, description="tokens per sequence, prompt and response together")
    lora: LoraConfig = Field(
        default_factory=lambda: LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        description="the LoRA adapter, merged into the weights at the end",
    )
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(4, ge=0, description="optimizer steps of linear warm-up")
    per_device_batch_size: int = Field(4, ge=1, description="samples per device per forward")
    gradient_accumulation_steps: int = Field(2, ge=1, description="forwards per optimizer step")
    logging_steps: int = Field(1, ge=1, description="optimizer steps between logged losses")


class DpoConfig(AlignmentConfig):
    """Plain DPO on the pairs, chosen over rejected (LoRA, merged)
    (:func:`trace_realign.core.alignment.dpo_align`): the settings of SFT plus DPO's own."""

    beta: float = Field(0.1, gt=0, description="DPO's inverse temperature")
    reference_batch_size: int = Field(8, ge=1, description="pairs per batch of the reference log-prob pass")


SHIPPED_LM_EVAL_TASKS = SHIPPED_ROOT / "data" / "lm_eval"
"""The folder of the lm-evaluation-harness task YAML files that ship with the package (``data/lm_eval``)."""


class LmEvalConfig(Section):
    """Utility on standard benchmarks through lm-evaluation-harness (lm-eval): each task's metrics
    on the reference and on the realigned model."""

    tasks: list[str] = Field(
        default_factory=list,
        description="harness tasks run before and after realignment: shipped (trace_mini_mc), from include_path, "
        "or the harness's own (mmlu, hellaswag, gsm8k, gpqa; they need network); empty: off",
    )
    limit: int | None = Field(None, ge=1, description="examples per task (default: all)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per question (default: each task's own)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    include_path: str | None = Field(
        None, description="a folder of your own harness task YAML files", json_schema_extra=INPUT_FILE
    )


class AttacksConfig(Section):
    """Attack success rate under the paper's adversarial wrappers (arXiv 2511.02623, adversarial stress tests)."""

    wrappers: list[Literal["screenwriter", "refusal_suppression"]] = Field(
        default_factory=list,
        description="wrappers around each attack prompt: screenwriter (a fictional thriller scene), "
        "refusal_suppression (answer directly, no safety lecture); empty: no attack evaluation",
    )
    max_prompts: int = Field(32, ge=1, description="attack prompts wrapped by each wrapper (the first this many)")
    prompts_path: str | None = Field(
        None,
        description="attack prompts (JSONL with a text 'prompt'); default: the 520 AdvBench behaviours shipped in pyrit",
        json_schema_extra=INPUT_FILE,
    )


class EvaluationConfig(Section):
    """Target policy agreement (TPA) before and after realignment, on held-out prompts."""

    enabled: bool = Field(True, description="false: no evaluate stage (and no held-out pairs)")
    prompts_path: str | None = Field(
        None, description="held-out prompts (JSONL with 'prompt'); default: held-out pairs", json_schema_extra=INPUT_FILE
    )
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="pairs held out of training for evaluation")
    max_prompts: int = Field(64, ge=1, description="prompts generated for and judged")
    max_new_tokens: int = Field(96, ge=1, description="tokens generated per prompt (greedy)")
    batch_size: int = Field(8, ge=1, description="prompts per generation batch")
    generator: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="what generates the evaluation and attack answers: transformers, or vllm (offline engine, the "
        "realigned model as a LoRA adapter on the base; needs vllm, see Scaling out)",
    )
    judge: JudgeConfig | None = Field(None, description="judge for generations; default: the oracle")
    labels_path: str | None = Field(
        None,
        description="generated responses labelled by hand (JSONL: prompt, response, compliant): the judge's "
        "accuracy on generated text, and TPA from the labels where a generation has one",
        json_schema_extra=INPUT_FILE,
    )
    attacks: AttacksConfig = Field(default_factory=AttacksConfig, description="attack success rate before and after")
    tpa_question: Literal["violation", "compliance"] = Field(
        "violation",
        description="what an LLM evaluation judge asks of each generation (TPA and attacks): violation "
        "('Is this response violating the policy?', an unparsable answer unknown) or compliance (the authors' "
        "'Compliant' or 'Non-compliant', an ambiguous answer non-compliant)",
    )
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="utility on lm-evaluation-harness tasks before and after")

    @field_validator("judge")
    @classmethod
    def _no_fallback(cls, value):
        """Only the oracle has a fallback: the evaluation judge asks one judge per generation."""
        if value is not None and value.fallback is not None:
            raise ValueError("fallback is the oracle's setting (oracle.fallback); the evaluation judge has none")
        return value

    @field_validator("generator")
    @classmethod
    def _vllm_is_installed(cls, value: str) -> str:
        """generator vllm where vllm is missing fails when the config loads, not after training."""
        if value == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "vllm is not installed here: install it (`pip install 'trace-realign[vllm]'` on a GPU machine; "
                "the CPU build's venv: `bash scripts/setup.sh --vllm`, .venv-vllm) or use generator transformers"
            )
        return value


def marked_settings(cfg: BaseModel, marks: tuple[str, ...], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted setting, value)`` for every set string setting whose field carries one of ``marks``
    in its ``json_schema_extra``, nested sections and judge configs included."""
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from marked_settings(value, marks, dotted + ".")
        elif isinstance(value, str) and isinstance(field.json_schema_extra, dict) and any(field.json_schema_extra.get(m) for m in marks):
            yield dotted, value


def input_files(cfg: BaseModel) -> dict[str, str]:
    """Every setting marked :data:`INPUT_FILE` that is set and names an existing local file or
    folder, as ``{"weights.gold_path": path, "oracle.model_path": path, ...}`` (nested sections and
    the judge configs included; a hub model name that is not a local path is left out). With
    benchmark tasks set (``evaluation.lm_eval.tasks``), the shipped task folder is an input too, as
    ``evaluation.lm_eval.shipped_tasks``: the evaluate stage reruns when its files change."""
    found = {dotted: value for dotted, value in marked_settings(cfg, ("input_file",)) if Path(value).exists()}
    evaluation = getattr(cfg, "evaluation", None)
    if isinstance(evaluation, EvaluationConfig) and evaluation.lm_eval.tasks:
        found["evaluation.lm_eval.shipped_tasks"] = str(SHIPPED_LM_EVAL_TASKS)
    return found
