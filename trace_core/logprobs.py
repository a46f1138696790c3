"""Response log-probabilities and the per-token logits the RETAIN KL compares.

Logits at position t predict token t + 1, so a sequence's response log-probability is
``sum_{t : response_mask[t+1]} log softmax(logits[t])[input_ids[t+1]]``.
"""

from __future__ import annotations

import torch

from trace_realign.core.tokenization import SequenceBatch


def forward_logits(model, batch: SequenceBatch) -> torch.Tensor:
    """Logits [N, T, V] of one batched forward pass."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def shifted(logits: torch.Tensor, batch: SequenceBatch):
    """(logits predicting each next token [N, T-1, V], next tokens [N, T-1], response mask [N, T-1])."""
    return logits[:, :-1], batch.input_ids[:, 1:], batch.response_mask[:, 1:]


def response_logps(logits: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """Summed log-probabilities of each sequence's response tokens, shape [N], float32."""
    pred, targets, mask = shifted(logits, batch)
    pred = pred.float()
    token_logps = torch.gather(pred, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(pred, dim=-1)
    return (token_logps * mask).sum(-1)


def sequence_logps(model, batch: SequenceBatch) -> torch.Tensor:
    """Summed response log-probabilities of a whole batch in one forward pass."""
    return response_logps(forward_logits(model, batch), batch)
