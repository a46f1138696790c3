"""The utility proxy: perplexity of given responses under the reference and the realigned model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trace_realign.core.data import Prompt
from trace_realign.core.errors import DataError
from trace_realign.core.evaluation.generation import as_reference
from trace_realign.core.logprobs import sequence_logps
from trace_realign.core.modeling import eval_mode
from trace_realign.core.tokenization import Encoder, length_batches, pad_sequences


def response_nll(
    model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, token count) of ``responses`` given their ``prompts``.

    Sequences are encoded as in training (:class:`~trace_realign.core.tokenization.Encoder`: chat-template
    prompt, response ending with one EOS, at most ``max_length`` tokens) and scored with
    :func:`trace_realign.core.logprobs.sequence_logps`; only response tokens count. Raises DataError
    when ``prompts`` and ``responses`` differ in length.
    """
    if len(prompts) != len(responses):
        raise DataError(f"perplexity: {len(prompts)} prompts but {len(responses)} responses")
    encoder = Encoder(tokenizer, max_length=max_length)
    sequences = [encoder.sequence(p, r) for p, r in zip(prompts, responses)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total_nll, n_tokens = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for batch_idx in length_batches([len(s.input_ids) for s in sequences], batch_size):
            batch = pad_sequences([sequences[i] for i in batch_idx], pad).to(device)
            total_nll -= float(sequence_logps(model, batch).double().sum())
            n_tokens += int(batch.response_mask[:, 1:].sum())
    return total_nll, n_tokens


def _perplexity(nll: float, n_tokens: int) -> float:
    if n_tokens == 0:
        raise DataError("perplexity: no response tokens to score")
    return math.exp(nll / n_tokens)


def response_perplexity(
    model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> float:
    """Token-level perplexity of ``responses`` given ``prompts``: exp(total NLL / response tokens),
    the mean taken over all response tokens together (a long response weighs more than a short one).
    Raises DataError when there is no response token to score."""
    return _perplexity(*response_nll(model, tokenizer, prompts, responses, max_length=max_length, batch_size=batch_size))


def utility_proxy(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    *,
    reference_model=None,
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Utility kept by realignment: perplexity of held-out responses (the pipeline uses RETAIN ones,
    behaviour the new policy keeps) under the reference and the realigned model.

    Returns {reference_perplexity, realigned_perplexity, perplexity_ratio = realigned / reference,
    n_responses, n_tokens}; a ratio near 1 means utility kept (issue 5 asks for within 10%). The
    reference is ``model`` with its LoRA adapter disabled, or ``reference_model`` when given
    (TraceError when neither is available).
    """
    kwargs = {"max_length": max_length, "batch_size": batch_size}
    with as_reference(model, reference_model) as ref:
        ref_nll, n_tokens = response_nll(ref, tokenizer, prompts, responses, **kwargs)
    new_nll, _ = response_nll(model, tokenizer, prompts, responses, **kwargs)
    ref_ppl, new_ppl = _perplexity(ref_nll, n_tokens), _perplexity(new_nll, n_tokens)
    return {
        "reference_perplexity": ref_ppl,
        "realigned_perplexity": new_ppl,
        "perplexity_ratio": new_ppl / ref_ppl,
        "n_responses": len(responses),
        "n_tokens": n_tokens,
    }
