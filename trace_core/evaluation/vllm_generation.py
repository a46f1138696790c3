"""Evaluation generation with an offline vLLM engine (``evaluation.generator: vllm``).

The reference model is the base model folder; the realigned model is the trained LoRA adapter on
it, served by the same engine through a ``LoRARequest`` (one engine load for both; a full fine-tune
has no adapter and generates with the transformers generator). Prompts are the transformers generator's
token ids (:class:`~trace_realign.core.tokenization.Encoder`: the same chat formatting and prompt
truncation), decoding is greedy and stops at the same EOS ids, and the new tokens are decoded by the
same tokenizer with special tokens skipped and white space stripped, so that the rest of the
evaluation (judging, TPA) sees the texts it would see from :func:`~trace_realign.core.evaluation.generate`.

vllm is an optional extra, imported only here (and in the vllm judge).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trace_realign.core.data import Prompt
from trace_realign.core.errors import TraceError
from trace_realign.core.evaluation.generation import MAX_PROMPT_LENGTH, Progress, eos_ids
from trace_realign.core.oracle.base import one_line
from trace_realign.core.oracle.vllm_backend import import_vllm
from trace_realign.core.tokenization import Encoder

# vLLM accepts these LoRA ranks (``max_lora_rank``); an adapter of rank r needs the smallest >= r.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: str | Path) -> int:
    """The ``max_lora_rank`` vLLM needs for the PEFT adapter folder ``adapter``: the smallest rank
    vLLM accepts that holds the adapter's ``r``. Raises TraceError for a folder without a readable
    ``adapter_config.json`` or a rank above vLLM's largest."""
    path = Path(adapter) / "adapter_config.json"
    try:
        r = int(json.loads(path.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: cannot read the LoRA adapter's rank ({one_line(exc, 120)})") from None
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise TraceError(f"{path}: LoRA rank {r} is above vLLM's largest ({LORA_RANKS[-1]})")


class VLLMGenerator:
    """Greedy generation of the reference and the realigned model with one offline vLLM engine.

    ``base`` is the base (reference) model folder, ``adapter`` the realigned model's PEFT LoRA folder,
    served on the base engine (``enable_lora``, requested per call with a ``LoRARequest``). Engine
    settings: ``dtype`` (float32 on a CPU), ``max_model_len`` (prompt plus new tokens), ``enforce_eager``
    (True on a CPU: no graph capture), ``seed``. The base engine loads here (SmolLM2-135M on 2 CPU
    cores: about 40 s); :meth:`close` releases it. On a CPU the KV cache size is vLLM's
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) environment variable.

    Raises TraceError when vllm is missing, when ``adapter`` is None (a full fine-tune: use the
    transformers generator), or when vLLM cannot load the model (one line naming the folder).
    """

    def __init__(
        self,
        base: str | Path,
        *,
        adapter: str | Path | None,
        dtype: str = "float32",
        max_model_len: int = MAX_PROMPT_LENGTH + 96,
        enforce_eager: bool = True,
        seed: int = 0,
    ):
        if adapter is None:
            raise TraceError(
                "evaluation.generator: vllm generates with the realigned model as a LoRA adapter; a full fine-tune "
                "(no adapter) needs evaluation.generator: transformers"
            )
        self.base, self.adapter = str(base), str(adapter)
        rank = lora_rank(self.adapter)  # a bad adapter folder fails before the engine loads
        self._vllm = import_vllm("evaluation.generator: vllm")
        try:
            self.llm: Any = self._vllm.LLM(
                model=self.base, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
                enable_lora=True, max_loras=1, max_lora_rank=rank,
            )  # fmt: skip
        except (OSError, ValueError, RuntimeError) as exc:
            raise TraceError(f"{self.base}: vllm could not load the model for evaluation generation: {one_line(exc, 200)}") from None

    def _generate(self, tokenizer, encoded: list[list[int]], stop: list[int], max_new_tokens: int, lora: Any = None) -> list[str]:
        """Greedy new tokens per prompt (token ids), decoded by ``tokenizer``; ``lora``: a LoRARequest or None (the base)."""
        params = self._vllm.SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop, skip_special_tokens=True, detokenize=False
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params=params, lora_request=lora, use_tqdm=False)
        return [tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True).strip() for o in outputs]

    def reference_and_realigned(
        self,
        tokenizer,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 96,
        max_prompt_length: int = MAX_PROMPT_LENGTH,
        greedy: bool = True,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[list[str], list[str], float, float]:
        """(reference generations, realigned generations, reference seconds, realigned seconds) for
        ``prompts``, as :func:`~trace_realign.core.evaluation.generate_reference_and_realigned` returns
        them; ``tokenizer`` is the base model's. ``batch_size`` is not used (vLLM schedules its own
        batches); ``progress`` sees ``(n, 2n)`` after the reference and ``(2n, 2n)`` after the realigned
        model. Raises ValueError for ``max_new_tokens`` < 1, TraceError for ``greedy=False`` (the
        vllm generator decodes greedily only) or after :meth:`close`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not greedy:
            raise TraceError("evaluation.generator: vllm decodes greedily only; use evaluation.generator: transformers to sample")
        if self.llm is None:
            raise TraceError("the vllm generator was closed")
        if not prompts:
            return [], [], 0.0, 0.0
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(self.base)
        except OSError:
            generation_config = None
        stop = eos_ids(generation_config, tokenizer)
        encoder = Encoder(tokenizer, max_length=max_prompt_length + max_new_tokens, max_prompt_length=max_prompt_length)
        encoded = [encoder.prompt(p) for p in prompts]
        n = len(prompts)
        t0 = time.perf_counter()
        reference = self._generate(tokenizer, encoded, stop, max_new_tokens)
        t1 = time.perf_counter()
        if progress is not None:
            progress(n, 2 * n)
        from vllm.lora.request import LoRARequest

        realigned = self._generate(tokenizer, encoded, stop, max_new_tokens, LoRARequest("realigned", 1, self.adapter))
        if progress is not None:
            progress(2 * n, 2 * n)
        return reference, realigned, t1 - t0, time.perf_counter() - t1

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the engine (its memory and engine-core process)."""
        import gc

        self.llm = None
        gc.collect()
