"""``make_judge``: a judge from its configuration."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from trace_realign.core.oracle.base import Judge
from trace_realign.core.oracle.config import (
    AnnotationsJudgeConfig,
    OpenAIJudgeConfig,
    TransformersJudgeConfig,
    VLLMJudgeConfig,
    parse_judge_config,
)


def make_judge(config: dict[str, Any] | BaseModel, where: str = "judge", question: str = "violation") -> Judge:
    """Validate ``config`` (ConfigError naming a bad setting) and build its backend's judge.

    ``question`` is the verdict question an LLM judge asks ("violation" or "compliance",
    :data:`~trace_realign.core.oracle.base.QUESTIONS`); the annotations judge reads no question.

    ``where`` names the config section in messages: "oracle" for the pipeline's judge,
    "evaluation.judge" for its evaluation judge, so an error says which setting to change.
    Backend modules are imported here, on demand, so that an openai-only user never imports
    torch and nobody imports vllm unless they ask for it.
    """
    cfg = parse_judge_config(config, where)
    if isinstance(cfg, OpenAIJudgeConfig):
        from trace_realign.core.oracle.openai_backend import OpenAIJudge

        return OpenAIJudge(cfg, where, question)
    if isinstance(cfg, TransformersJudgeConfig):
        from trace_realign.core.oracle.transformers_backend import TransformersJudge

        return TransformersJudge(cfg, where, question)
    if isinstance(cfg, VLLMJudgeConfig):
        from trace_realign.core.oracle.vllm_backend import VLLMJudge

        return VLLMJudge(cfg, where, question)
    assert isinstance(cfg, AnnotationsJudgeConfig)
    from trace_realign.core.oracle.annotations import AnnotationsJudge

    return AnnotationsJudge()
