"""Tokenization of preference data the way DPO expects it (after TRL's conventions).

- The prompt is rendered with the model's chat template and its generation prompt, then
  tokenized without adding special tokens (the template already holds BOS where the model
  uses one: adding it again is the classic duplicate-BOS bug).
- The response is tokenized on its own and ends with exactly one EOS.
- Labels cover the response tokens only: prompt and padding are masked.
- Truncation keeps the start of the prompt (it shortens the last message's text and renders the
  template again, so the assistant header survives) and the start of the response; a response
  is never dropped whole because the prompt gets at most ``max_prompt_length < max_length``
  tokens. Truncations are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from trace_core.data import Prompt


@dataclass
class TruncationStats:
    prompts_truncated: int = 0
    responses_truncated: int = 0
    sequences: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "sequences": self.sequences,
        }


@dataclass(frozen=True)
class EncodedSequence:
    """Prompt followed by response; ``response_start`` is the index of the first response token."""

    input_ids: tuple[int, ...]
    response_start: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it before its answer (chat template + generation prompt).

    A tokenizer without a chat template (a base model) gets the plain text of the messages.
    """
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    ids = _ids(tokenizer, render_prompt(tokenizer, prompt))
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


class Encoder:
    """Encodes prompts and responses for one tokenizer and length budget."""

    def __init__(self, tokenizer, max_length: int = 256, max_prompt_length: int | None = None):
        if max_prompt_length is None:
            max_prompt_length = max_length // 2
        if not 0 < max_prompt_length < max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be positive and below max_length ({max_length})"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.stats = TruncationStats()
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt(self, prompt: Prompt) -> list[int]:
        """Prompt token ids, at most ``max_prompt_length``, keeping the prompt's start."""
        key = prompt if isinstance(prompt, str) else repr(prompt)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        ids = _prompt_ids(self.tokenizer, prompt)
        if len(ids) > self.max_prompt_length:
            self.stats.prompts_truncated += 1
            ids = self._truncate_prompt(prompt, ids)
        self._prompt_cache[key] = ids
        return ids

    def _truncate_prompt(self, prompt: Prompt, ids: list[int]) -> list[int]:
        messages = as_messages(prompt)
        content_ids = _ids(self.tokenizer, messages[-1]["content"])
        overhead = len(ids) - len(content_ids)
        keep = self.max_prompt_length - overhead
        # Token boundaries can shift when text is cut and tokenized again: shrink until it fits.
        while keep > 0:
            messages[-1]["content"] = self.tokenizer.decode(content_ids[:keep])
            cut = _prompt_ids(self.tokenizer, messages)
            if len(cut) <= self.max_prompt_length:
                return cut
            keep -= max(1, len(cut) - self.max_prompt_length)
        # The template's own text (e.g. a long system message) exceeds the budget.
        return ids[: self.max_prompt_length]

    def response(self, response: str) -> list[int]:
        """Response token ids ending with exactly one EOS."""
        ids = _ids(self.tokenizer, response)
        eos = self.tokenizer.eos_token_id
        while ids and ids[-1] == eos:
            ids.pop()
        return ids + [eos]

    def sequence(self, prompt: Prompt, response: str) -> EncodedSequence:
        prompt_ids = self.prompt(prompt)
        response_ids = self.response(response)
        budget = self.max_length - len(prompt_ids)
        if len(response_ids) > budget:
            self.stats.responses_truncated += 1
            response_ids = response_ids[:budget]
        self.stats.sequences += 1
        return EncodedSequence(tuple(prompt_ids + response_ids), len(prompt_ids))


@dataclass
class SequenceBatch:
    """Right-padded sequences: ``response_mask[i, t]`` is 1 where token t belongs to the response."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    lengths: list[int] = field(default_factory=list)

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.lengths
        )


def pad_sequences(sequences: Sequence[EncodedSequence], pad_token_id: int) -> SequenceBatch:
    """Stack encoded sequences into one right-padded batch."""
    width = max(len(s.input_ids) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(sequences):
        length = len(s.input_ids)
        input_ids[i, :length] = torch.tensor(s.input_ids, dtype=torch.long)
        attention[i, :length] = 1
        response[i, s.response_start : length] = 1
    return SequenceBatch(input_ids, attention, response, [len(s.input_ids) for s in sequences])


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little is padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, for generation and next-token scoring."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask
