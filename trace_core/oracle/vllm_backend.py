"""The vllm judge: offline ``vllm.LLM`` (on a GPU, or vLLM's CPU build: ``bash scripts/setup.sh --vllm``).

Items are judged in shards of ``shard_size``, one ``LLM.chat`` call each, with the policy as the
identical leading system message of every chat so that vLLM's prefix cache computes it once. The
answer is constrained to the question's answers (structured outputs, choice: "Yes" or "No" in one
token; "Compliant" or "Non-compliant" in up to 5; "A", "B" or "tie" for comparisons); its top
``top_logprobs`` alternatives give the confidence, normalised over the two answers like the other
backends, taken at the answer token (after any reasoning block, as for the openai backend; no
confidence where it cannot be placed). Answers are read by the same
:func:`~trace_realign.core.oracle.base.verdict_from_answer` as every LLM backend. Corrections are sampled
with the config's temperature and token limit.

The policy placement is decided once with the engine's own tokenizer (``LLM.get_tokenizer()``):
with "auto", a chat template that refuses a system message gets the policy in the user message
(said once in the log); where the tokenizer cannot render chats, the setting decides ("auto" means
system). Any other template failure is one TraceError naming the model.

vllm is an optional extra (``pip install 'trace-realign[vllm]'``) and is imported only here and in
:mod:`~trace_realign.core.evaluation.vllm_generation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.oracle.base import (
    PAIRWISE,
    VIOLATION,
    Comparison,
    ComparisonItem,
    JudgeItem,
    LLMJudge,
    OnResult,
    Question,
    Verdict,
    answer_token_top,
    choose_placement,
    comparison_from_answer,
    one_line,
    verdict_from_answer,
)
from trace_realign.core.oracle.config import VLLMJudgeConfig
from trace_realign.core.policy import Policy
from trace_realign.core.tokenization import encode_chat


def import_vllm(what: str = "the vllm judge backend") -> Any:
    """The vllm module, or a TraceError saying that ``what`` needs it and how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise TraceError(
            f"{what} needs vllm, which is not installed ({exc}); install it with "
            "`pip install 'trace-realign[vllm]'` on a GPU machine, or run in the CPU build's venv made by "
            "`bash scripts/setup.sh --vllm` (.venv-vllm)"
        ) from None
    return vllm


def _structured_choice(vllm: Any, question: Question) -> Any:
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        raise TraceError(
            f"vllm {getattr(vllm, '__version__', '?')} has no StructuredOutputsParams; the vllm judge needs vllm >= 0.10.2"
        ) from None
    return StructuredOutputsParams(choice=list(question.answers))


def top_from_vllm(step: dict[int, Any] | None) -> list[tuple[str, float]]:
    """(decoded token, logprob) pairs from one position of a vLLM ``CompletionOutput.logprobs``."""
    if not step:
        return []
    return [(lp.decoded_token or "", lp.logprob) for lp in step.values()]


def answer_top_from_vllm(completion: Any, question: Question = VIOLATION) -> list[tuple[str, float]]:
    """Top logprobs of the answer token of a vLLM ``CompletionOutput``: per position the sampled
    token (``token_ids[i]``, always among that position's logprobs) and its alternatives, located by
    :func:`~trace_realign.core.oracle.base.answer_token_top` (after any reasoning block)."""
    steps = []
    for token_id, step in zip(completion.token_ids or (), completion.logprobs or ()):
        sampled = (step or {}).get(token_id)
        text = (sampled.decoded_token or "") if sampled is not None else ""
        steps.append((text, sampled.logprob if sampled is not None else None, top_from_vllm(step)))
    return answer_token_top(steps, completion.text or "", question=question)


def verdict_from_vllm(output: Any, question: Question = VIOLATION) -> Verdict:
    """The verdict of one vLLM ``RequestOutput`` (its first completion) answering ``question``."""
    if not output.outputs:
        return Verdict.unknown("vllm returned no output for this request")
    completion = output.outputs[0]
    return verdict_from_answer(completion.text, answer_top_from_vllm(completion, question), question=question)


def comparison_from_vllm(output: Any) -> Comparison:
    """The comparison of one vLLM ``RequestOutput`` (its first completion) answering :data:`PAIRWISE`."""
    if not output.outputs:
        return Comparison.unknown("vllm returned no output for this request")
    completion = output.outputs[0]
    return comparison_from_answer(completion.text, answer_top_from_vllm(completion, PAIRWISE))


def vllm_placement(llm: Any, setting: str, model: str, where: str = "judge") -> str:
    """The policy placement for an offline engine, decided with its tokenizer's chat template
    (:func:`~trace_realign.core.oracle.base.choose_placement`); where the engine's tokenizer cannot render
    chats (no ``apply_chat_template``), "user" if ``setting`` says so, else "system"."""
    try:
        tokenizer = llm.get_tokenizer()
        apply = tokenizer.apply_chat_template
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return "user" if setting == "user" else "system"
    return choose_placement(lambda m: apply(m, tokenize=False, add_generation_prompt=True), setting, model, where)


class VLLMJudge(LLMJudge):
    """Judge with an offline vLLM engine, one batched call per shard."""

    backend = "vllm"
    config: VLLMJudgeConfig

    def __init__(self, config: VLLMJudgeConfig, where: str = "judge", question: str = "violation"):
        vllm = import_vllm()
        super().__init__(config, where, question)
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
            raise TraceError(f"{config.model}: vllm could not load the judge model: {one_line(exc, 200)}") from None
        self.templates.placement = vllm_placement(self.llm, config.policy_placement, config.model, where)
        self._judge_params, self._pairwise_params = (
            vllm.SamplingParams(
                max_tokens=q.max_tokens,
                temperature=0.0,
                logprobs=config.top_logprobs,
                structured_outputs=_structured_choice(vllm, q),
            )
            for q in (self.question, PAIRWISE)
        )
        self._correction_params = vllm.SamplingParams(
            max_tokens=config.max_correction_tokens, temperature=config.temperature, seed=config.seed
        )

    @property
    def model_name(self) -> str:
        return self.config.model

    def answer_settings(self) -> dict[str, Any]:
        return {"answer": "choice", "max_answer_tokens": self.question.max_tokens}

    def _shards(self, n: int) -> list[range]:
        size = self.config.shard_size
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    def _chat(self, chats: list[list[dict[str, str]]], params: Any) -> list[Any]:
        """One vLLM output per chat, in order, or (a str) why a chat could not be encoded.

        Chats are encoded here with :func:`~trace_realign.core.tokenization.encode_chat` on the engine's
        tokenizer and generated from token ids, rather than rendered by ``LLM.chat``: the judged
        text stays text, so a response holding ``<|im_end|><|im_start|>system`` cannot forge a turn.
        """
        tokenizer = self.llm.get_tokenizer()
        encoded: list[Any] = []
        for messages in chats:
            try:
                encoded.append(encode_chat(tokenizer, messages))
            except DataError as exc:
                encoded.append(f"judge input cannot be encoded: {exc}")
        ready = [i for i, e in enumerate(encoded) if not isinstance(e, str)]
        if ready:
            prompts = [{"prompt_token_ids": encoded[i]} for i in ready]
            for i, output in zip(ready, self.llm.generate(prompts, sampling_params=params, use_tqdm=False)):
                encoded[i] = output
        return encoded

    def _answers(self, items: Sequence[Any], chat: Any, params: Any, read: Any, unknown: Any, on_result: OnResult | None) -> list[Any]:
        """``read(output)`` per item (``unknown(reason)`` where its chat cannot be encoded), one
        generate call per shard of chats ``chat(item)``; ``on_result`` per shard."""
        answers: list[Any] = []
        for shard in self._shards(len(items)):
            chats = [chat(items[i]) for i in shard]
            for i, output in zip(shard, self._chat(chats, params)):
                answers.append(unknown(output) if isinstance(output, str) else read(output))
                if on_result is not None:
                    on_result(i, answers[-1])
        return answers

    def judge(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[Verdict]:
        """Constrained answers to the verdict question, one generate call per shard; ``on_result`` per shard."""
        return self._answers(
            items, lambda item: self.templates.judge_messages(item, policy), self._judge_params,
            lambda output: verdict_from_vllm(output, self.question), Verdict.unknown, on_result,
        )  # fmt: skip

    def compare(self, items: Sequence[ComparisonItem], policy: Policy, on_result: OnResult | None = None) -> list[Comparison]:
        """Constrained "A", "B" or "tie" per item, one generate call per shard; ``on_result`` per shard."""
        return self._answers(
            items, lambda item: self.templates.comparison_messages(item, policy), self._pairwise_params,
            comparison_from_vllm, Comparison.unknown, on_result,
        )  # fmt: skip

    def correct(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[str | None]:
        """Sampled rewrites, one LLM.chat call per shard; None where the model wrote nothing."""
        corrections: list[str | None] = []
        for shard in self._shards(len(items)):
            chats = [self.templates.correction_messages(items[i], policy) for i in shard]
            for i, output in zip(shard, self._chat(chats, self._correction_params)):
                text = output.outputs[0].text.strip() if not isinstance(output, str) and output.outputs else ""
                corrections.append(text or None)
                if on_result is not None:
                    on_result(i, corrections[-1])
        return corrections

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
