"""Generation on held-out prompts: the reference model's and the realigned model's responses."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from trace_realign.core.data import Prompt
from trace_realign.core.errors import TraceError
from trace_realign.core.modeling import eval_mode, is_peft, reference_mode
from trace_realign.core.tokenization import Encoder, left_pad, length_batches

MAX_PROMPT_LENGTH = 512
"""Prompt tokens kept by default (longer prompts are cut, keeping the assistant header)."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each batch."""


class Generator(Protocol):
    """An engine that generates the reference's and the realigned model's answers itself
    (:class:`~trace_realign.core.evaluation.vllm_generation.VLLMGenerator`), in place of the
    transformers model passed to :func:`generate_reference_and_realigned`."""

    def reference_and_realigned(
        self, tokenizer, prompts: Sequence[Prompt], *, progress: Progress | None = None, **generate_kwargs: Any
    ) -> tuple[list[str], list[str], float, float]: ...


def eos_ids(generation_config, tokenizer) -> list[int]:
    """Token ids that end a generation: ``generation_config``'s EOS ids (a transformers
    GenerationConfig, or None) and the tokenizer's. Raises TraceError when neither names one."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise TraceError("the tokenizer and the model's generation config name no EOS token; generation cannot stop")
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    greedy: bool = True,
    temperature: float = 0.7,
    seed: int = 0,
    max_prompt_length: int = MAX_PROMPT_LENGTH,
    progress: Progress | None = None,
) -> list[str]:
    """One generated response per prompt, in order.

    Each prompt is rendered with the model's chat template and generation prompt
    (:func:`trace_realign.core.tokenization.render_prompt`, via :class:`~trace_realign.core.tokenization.Encoder`,
    which adds no special tokens and keeps the assistant header when it cuts a prompt longer than
    ``max_prompt_length`` tokens). Prompts are batched by length and left-padded by hand (the
    tokenizer is not touched); ``generate`` derives each row's position ids from the attention
    mask, so a padded row sees the positions it would see alone. Only the new tokens (at most
    ``max_new_tokens``) are decoded, special tokens skipped, white space stripped.

    ``greedy=True`` (default) decodes greedily and is deterministic: the batched output equals the
    output of each prompt alone (checked in float32 on CPU, on the tiny test model and on
    SmolLM2-135M-Instruct; in bfloat16 or on GPU, kernels chosen by batch shape can round
    differently and flip a near-tie). ``greedy=False`` samples at ``temperature`` under ``seed``
    without touching the caller's random state (samples then depend on how prompts are batched).
    The model runs in eval mode (no dropout); its training flag is restored afterwards.

    Raises ValueError when ``max_new_tokens`` < 1, TraceError when neither the tokenizer nor the
    model's generation config names an EOS token.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoder = Encoder(tokenizer, max_length=max_prompt_length + max_new_tokens, max_prompt_length=max_prompt_length)
    encoded = [encoder.prompt(p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling: dict[str, Any] = (
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    )
    out: list[str] = [""] * len(prompts)
    done = 0
    stop = eos_ids(getattr(model, "generation_config", None), tokenizer)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model), torch.inference_mode():
        torch.manual_seed(seed)
        for batch in length_batches([len(e) for e in encoded], batch_size):
            ids, mask = left_pad([encoded[i] for i in batch], pad, device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad,
                **sampling,
            )
            texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                out[i] = text.strip()
            done += len(batch)
            if progress is not None:
                progress(done, len(prompts))
    return out


@contextlib.contextmanager
def as_reference(model, reference_model=None) -> Iterator[Any]:
    """The reference model, for the duration of the ``with`` block: ``reference_model`` when given,
    else ``model`` with its LoRA adapter disabled (the adapter is enabled again on exit).

    Raises TraceError when ``model`` has no LoRA adapter and no ``reference_model`` is given.
    """
    if reference_model is not None:
        yield reference_model
    elif is_peft(model):
        with reference_mode(model):
            yield model
    else:
        raise TraceError(
            "the reference needs a LoRA model (its adapter disabled) or, after full fine-tuning, "
            "the frozen reference model passed as reference_model"
        )


def generate_reference_and_realigned(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    reference_model=None,
    progress: Progress | None = None,
    generator: Generator | None = None,
    **generate_kwargs: Any,
) -> tuple[list[str], list[str], float, float]:
    """(reference generations, realigned generations, reference seconds, realigned seconds) for
    ``prompts``, the seconds being each model's wall-clock time.

    For a peft LoRA model the reference is the same model with its adapter disabled, so one copy of
    the weights serves both; after full fine-tuning pass the frozen reference as ``reference_model``
    (TraceError otherwise). ``generate_kwargs`` go to :func:`generate` (the same settings for both
    models). ``progress`` sees the reference's prompts and then the realigned model's, out of twice
    their number. With a ``generator`` (``evaluation.generator: vllm``) that engine generates both
    instead, with the same prompts, formatting and settings
    (:meth:`~trace_realign.core.evaluation.vllm_generation.VLLMGenerator.reference_and_realigned`).
    """
    if generator is not None:
        return generator.reference_and_realigned(tokenizer, prompts, progress=progress, **generate_kwargs)
    n = len(prompts)

    def offset(start: int) -> Progress | None:
        return None if progress is None else (lambda done, _total: progress(start + done, 2 * n))

    t0 = time.perf_counter()
    with as_reference(model, reference_model) as ref:
        reference = generate(ref, tokenizer, prompts, progress=offset(0), **generate_kwargs)
    t1 = time.perf_counter()
    realigned = generate(model, tokenizer, prompts, progress=offset(n), **generate_kwargs)
    return reference, realigned, t1 - t0, time.perf_counter() - t1
