"""The vllm judge: offline ``vllm.LLM`` on a GPU.

Items are judged in shards of ``shard_size``, one ``LLM.chat`` call each, with the policy as the
identical leading system message of every chat so that vLLM's prefix cache computes it once. The
single output token is constrained to "Yes" or "No" (structured outputs, choice); its top
``top_logprobs`` alternatives give the confidence, normalised over the two answers like the other
backends. Corrections are sampled with the config's temperature and token limit.

vllm is an optional extra (``pip install 'trace-realign[vllm]'``) and is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trace_core.errors import TraceError
from trace_core.oracle.base import ANSWERS, JudgeItem, LLMJudge, OnResult, Verdict, verdict_from_answer
from trace_core.oracle.config import VLLMJudgeConfig
from trace_core.policy import Policy


def import_vllm() -> Any:
    """The vllm module, or a TraceError saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise TraceError(
            f"the vllm judge backend needs vllm, which is not installed ({exc}); "
            "install it with `pip install 'trace-realign[vllm]'` on a GPU machine, or use backend openai "
            "against a `vllm serve` endpoint"
        ) from None
    return vllm


def _structured_choice(vllm: Any) -> Any:
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        raise TraceError(
            f"vllm {getattr(vllm, '__version__', '?')} has no StructuredOutputsParams; the vllm judge needs vllm >= 0.10.2"
        ) from None
    return StructuredOutputsParams(choice=list(ANSWERS))


def top_from_vllm(step: dict[int, Any] | None) -> list[tuple[str, float]]:
    """(decoded token, logprob) pairs from one position of a vLLM ``CompletionOutput.logprobs``."""
    if not step:
        return []
    return [(lp.decoded_token or "", lp.logprob) for lp in step.values()]


class VLLMJudge(LLMJudge):
    """Judge with an offline vLLM engine, one batched call per shard."""

    backend = "vllm"
    config: VLLMJudgeConfig

    def __init__(self, config: VLLMJudgeConfig):
        vllm = import_vllm()
        super().__init__(config)
        self._vllm = vllm
        kwargs: dict[str, Any] = {
            "model": config.model,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "dtype": config.dtype,
            "enable_prefix_caching": True,
            "enforce_eager": config.enforce_eager,
        }
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.seed is not None:
            kwargs["seed"] = config.seed
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TraceError(f"{config.model}: vllm could not load the judge model: {str(exc).splitlines()[0]}") from None
        self._judge_params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=config.top_logprobs,
            structured_outputs=_structured_choice(vllm),
        )
        self._correction_params = vllm.SamplingParams(
            max_tokens=config.max_correction_tokens, temperature=config.temperature, seed=config.seed
        )

    @property
    def model_name(self) -> str:
        return self.config.model

    def answer_settings(self) -> dict[str, Any]:
        return {"answer": "choice", "max_answer_tokens": 1}

    def _shards(self, n: int) -> list[range]:
        size = self.config.shard_size
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    def _chat(self, chats: list[list[dict[str, str]]], params: Any) -> list[Any]:
        return self.llm.chat(chats, sampling_params=params, use_tqdm=False)

    @staticmethod
    def _verdict(output: Any) -> Verdict:
        if not output.outputs:
            return Verdict.unknown("vllm returned no output for this request")
        completion = output.outputs[0]
        top = top_from_vllm(completion.logprobs[0] if completion.logprobs else None)
        return verdict_from_answer(completion.text, top)

    def judge(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[Verdict]:
        """Constrained one-token answers, one LLM.chat call per shard; ``on_result`` per shard."""
        verdicts: list[Verdict] = []
        for shard in self._shards(len(items)):
            chats = [self.templates.judge_messages(items[i], policy) for i in shard]
            for i, output in zip(shard, self._chat(chats, self._judge_params)):
                verdict = self._verdict(output)
                verdicts.append(verdict)
                if on_result is not None:
                    on_result(i, verdict)
        return verdicts

    def correct(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[str | None]:
        """Sampled rewrites, one LLM.chat call per shard; None where the model wrote nothing."""
        corrections: list[str | None] = []
        for shard in self._shards(len(items)):
            chats = [self.templates.correction_messages(items[i], policy) for i in shard]
            for i, output in zip(shard, self._chat(chats, self._correction_params)):
                text = output.outputs[0].text.strip() if output.outputs else ""
                corrections.append(text or None)
                if on_result is not None:
                    on_result(i, corrections[-1])
        return corrections

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
