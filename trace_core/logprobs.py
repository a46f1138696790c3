"""Response log-probabilities without full-vocabulary logits.

Logits at position t predict token t + 1, so a sequence's response log-probability is
``sum_{t : response_mask[t+1]} log softmax(W h_t)[input_ids[t+1]]``, with ``h_t`` the final hidden
state at position t and ``W`` [V, H] the LM head. Only the response positions need the head, and a
token's log-probability needs only ``<W[y], h_t>`` and ``logsumexp_v <W[v], h_t>``:
:func:`response_tokens` runs the model's body once, keeps the hidden states at response positions
([M, H], M response tokens in the batch), and :func:`target_logprobs` computes their
log-probabilities in chunks of rows, so neither the [N, T, V] logits of every position nor a
full-vocabulary log-softmax is ever held (its backward recomputes each chunk's logits, the way
fused linear-cross-entropy kernels do). The RETAIN KL, which needs whole distributions, takes
:meth:`ResponseTokens.logits` of the RETAIN response tokens only.

A model whose logits are not ``lm_head(last hidden state)`` (logit soft-capping or scaling, a head
with a bias or an adapter) is detected on first use and takes the full-vocabulary path
(:func:`forward_logits` + :func:`response_logps`), which is also the reference the tests and
``benchmarks/logprobs.py`` compare against.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from trace_realign.core.tokenization import SequenceBatch

# Elements of one chunk of logits ([rows, V], float32): 2**24 is 64 MiB, 341 rows at V = 49,152.
CHUNK_ELEMENTS = 1 << 24

_FULL_VOCABULARY = contextvars.ContextVar("trace_realign_full_vocabulary", default=False)
_PLAIN_HEAD: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def full_vocabulary_logits():
    """Within the block every log-prob takes the full-vocabulary path (benchmarks and tests compare)."""
    token = _FULL_VOCABULARY.set(True)
    try:
        yield
    finally:
        _FULL_VOCABULARY.reset(token)


# --------------------------------------------------------------------------- the full-vocabulary path


def forward_logits(model, batch: SequenceBatch) -> torch.Tensor:
    """Logits [N, T, V] of one batched forward pass (the full-vocabulary path)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def shifted(logits: torch.Tensor, batch: SequenceBatch):
    """(logits predicting each next token [N, T-1, V], next tokens [N, T-1], response mask [N, T-1])."""
    return logits[:, :-1], batch.input_ids[:, 1:], batch.response_mask[:, 1:]


def response_logps(logits: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """Summed log-probabilities [N] (float32) of each sequence's response tokens from full logits [N, T, V]."""
    pred, targets, mask = shifted(logits, batch)
    pred = pred.float()
    token_logps = torch.gather(pred, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(pred, dim=-1)
    return (token_logps * mask).sum(-1)


# --------------------------------------------------------------------------- chunked log-probs from hidden states


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _TargetLogProb(torch.autograd.Function):
    """``log softmax(hidden @ weight^T)[targets]`` row by row in chunks.

    Where only ``hidden`` needs a gradient (the frozen head of LoRA training and of the impact
    scores), the forward also forms each row's gradient ``d out_r / d hidden_r = (onehot(y_r) -
    softmax(z_r)) @ weight`` [H] while the chunk's logits exist, as fused linear cross-entropy
    kernels do (Liger-Kernel, arXiv 2410.10989), and the backward only scales it by the incoming
    gradient: two head matmuls per row instead of three. Where ``weight`` needs a gradient too
    (its gradient needs the incoming one inside the [c, V] product), the backward recomputes each
    chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grad_enabled):
        m = hidden.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        # needs_input_grad says which inputs require grad, also under torch.no_grad(): the caller's mode decides
        fused = grad_enabled and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        direction = torch.empty_like(hidden) if fused else None  # [M, H]: d out_r / d hidden_r
        for s in range(0, m, chunk):
            logits = F.linear(hidden[s : s + chunk], weight).float()  # [c, V]
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            if fused:
                d = logits.sub_(lse[s : s + chunk, None]).exp_().neg_()  # -softmax, [c, V], in place of the logits
                d.scatter_add_(-1, targets[s : s + chunk, None], torch.ones_like(d[:, :1]))  # onehot - softmax
                direction[s : s + chunk] = d.to(weight.dtype) @ weight  # [c, H]
        ctx.chunk = chunk
        ctx.fused = fused
        if fused:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.float()
        if ctx.fused:
            (direction,) = ctx.saved_tensors
            return (direction.float() * grad[:, None]).to(direction.dtype), None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s : s + chunk], grad[s : s + chunk, None]  # [c, H], [c, 1]
            # d out_r / d logits_r = onehot(y_r) - softmax(logits_r), times the incoming gradient
            d = F.linear(h, weight).float().sub_(lse[s : s + chunk, None]).exp_().mul_(-g)  # [c, V]
            d.scatter_add_(-1, targets[s : s + chunk, None], g)
            d = d.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = d @ weight  # [c, H]
            if grad_weight is not None:
                grad_weight.addmm_(d.t(), h)  # [V, H]
        return grad_hidden, grad_weight, None, None, None


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``log softmax(hidden @ weight^T)[r, targets[r]]`` for every row, shape [M], float32.

    ``hidden`` [M, H] and ``weight`` [V, H] share a dtype; the logits are computed in it and
    converted to float32, as ``lm_head(h).float()`` would be. At most ``chunk_rows`` rows of
    logits ([chunk_rows, V], float32) exist at a time, forward or backward; the default keeps a
    chunk at 64 MiB. Differentiable in ``hidden`` and ``weight``: with grad enabled and only
    ``hidden`` requiring it (a frozen head), the forward also forms each row's gradient direction
    [M, H] and the backward scales it, so the head's matmul runs twice per row in all (Liger-Kernel's
    fused linear cross-entropy, arXiv 2410.10989); otherwise the backward recomputes the logits.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()
    return _TargetLogProb.apply(hidden, weight, targets, chunk_rows or _chunk_rows(weight.shape[0]), torch.is_grad_enabled())


@dataclass
class ResponseTokens:
    """The response tokens of a batch of N sequences: M of them, row-major.

    ``rows`` [M] and ``positions`` [M] say where each token's prediction is made (position t
    predicts token t + 1), ``targets`` [M] the token. Either ``hidden`` [M, H] with the head's
    ``weight`` [V, H] (the chunked path) or ``full_logits`` [M, V] (the full-vocabulary path) is set.
    """

    n_rows: int
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    full_logits: torch.Tensor | None = None

    def token_logps(self) -> torch.Tensor:
        """Log-probability of each response token, [M], float32."""
        if self.full_logits is not None:
            pred = self.full_logits.float()
            return pred.gather(-1, self.targets[:, None]).squeeze(-1) - torch.logsumexp(pred, dim=-1)
        return target_logprobs(self.hidden, self.weight, self.targets)

    def sequence_logps(self) -> torch.Tensor:
        """Summed response log-probability of each sequence, [N], float32 (0 for one without response)."""
        logps = self.token_logps()
        return logps.new_zeros(self.n_rows).index_add(0, self.rows, logps)

    def row_means(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` [M] averaged over each row's tokens, [N] (0 for a row without response)."""
        total = values.new_zeros(self.n_rows).index_add(0, self.rows, values)
        count = values.new_zeros(self.n_rows).index_add(0, self.rows, torch.ones_like(values))
        return total / count.clamp(min=1.0)

    def logits(self, select: torch.Tensor | None = None) -> torch.Tensor:
        """Full next-token logits [m, V] (float32) of the selected tokens (a bool mask or indices over M)."""
        if self.full_logits is not None:
            chosen = self.full_logits if select is None else self.full_logits[select]
            return chosen.float()
        chosen = self.hidden if select is None else self.hidden[select]
        return F.linear(chosen, self.weight).float()


def _unwrap(model) -> nn.Module:
    """The transformers model inside DDP/accelerate and PEFT wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner, nn.Module) and not hasattr(inner, "get_output_embeddings"):
        inner = inner.module  # DistributedDataParallel and friends
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()  # a PeftModel: LoRA layers live inside the base model's modules
    return inner


def _plain_head(inner: nn.Module):
    """(body, head) when the model's logits are ``head(body(...).last_hidden_state)`` and head is a bias-free Linear."""
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(body, nn.Module) or body is inner:
        return None
    return body, head


def _position_index(batch: SequenceBatch):
    keep = batch.response_mask[:, 1:].bool()  # [N, T-1]: position t predicts a response token t + 1
    rows, positions = keep.nonzero(as_tuple=True)  # [M], [M], row-major
    return rows, positions, batch.input_ids[rows, positions + 1]


def _full_tokens(model, batch: SequenceBatch) -> ResponseTokens:
    rows, positions, targets = _position_index(batch)
    logits = forward_logits(model, batch)  # [N, T, V]
    return ResponseTokens(batch.input_ids.shape[0], rows, positions, targets, full_logits=logits[rows, positions])


def response_tokens(model, batch: SequenceBatch, *, chunked: bool = True) -> ResponseTokens:
    """One forward pass of ``model`` over ``batch`` ([N, T]), kept at the response tokens only.

    The chunked path runs the model with ``logits_to_keep=1`` (the head sees one position per
    row) and takes the final hidden states from its body with a forward hook; the first call on
    a model checks that its last-position logits equal ``head(hidden)`` and otherwise marks the
    model for the full-vocabulary path. ``chunked=False`` (or :func:`full_vocabulary_logits`)
    forces the full path, e.g. where hooks must see the head run on every position.
    """
    inner = _unwrap(model)
    split = _plain_head(inner) if chunked and not _FULL_VOCABULARY.get() and _PLAIN_HEAD.get(inner, True) else None
    if split is None:
        return _full_tokens(model, batch)
    body, head = split
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = body.register_forward_hook(grab)
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        _PLAIN_HEAD[inner] = False
        return _full_tokens(model, batch)
    hidden = captured[0]  # [N, T, H]
    if inner not in _PLAIN_HEAD:
        with torch.no_grad():
            expected = out.logits[:, -1].float()  # [N, V]
            plain = F.linear(hidden[:, -1], head.weight).float()
            _PLAIN_HEAD[inner] = expected.shape == plain.shape and torch.allclose(plain, expected, rtol=1e-4, atol=1e-4)
        if not _PLAIN_HEAD[inner]:
            return _full_tokens(model, batch)
    rows, positions, targets = _position_index(batch)
    return ResponseTokens(batch.input_ids.shape[0], rows, positions, targets, hidden=hidden[rows, positions], weight=head.weight)


def sequence_logps(model, batch: SequenceBatch, *, chunked: bool = True) -> torch.Tensor:
    """Summed response log-probabilities [N] (float32) of a whole batch in one forward pass."""
    return response_tokens(model, batch, chunked=chunked).sequence_logps()
