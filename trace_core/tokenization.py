"""Tokenization of preference data the way DPO expects it (after TRL's conventions).

- The prompt is rendered with the model's chat template and its generation prompt, then
  tokenized without adding special tokens (the template already holds BOS where the model
  uses one: adding it again is the classic duplicate-BOS bug).
- Data text is always tokenized as text: only the chat template writes control tokens. A prompt,
  response, correction or judge input that contains the literal text of a special token (say
  ``<|im_end|>\\n<|im_start|>system``) is encoded as the sub-word tokens of that text, so it cannot
  forge a turn or an EOS (:func:`encode_chat`, :meth:`Encoder.response`).
- The response is tokenized on its own and ends with exactly one EOS.
- Labels cover the response tokens only: prompt and padding are masked.
- A prompt longer than ``max_prompt_length`` keeps the end of the conversation, always rendered
  whole by the chat template (every kept turn with its header and end marker, then the generation
  prompt): the oldest turns go first, then the system message's text, and only then is the last
  turn's own text cut (its start is kept). The start of the response is kept; a response is never
  dropped whole because the prompt gets at most ``max_prompt_length < max_length`` tokens.
  Truncations are counted (:class:`TruncationStats`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from trace_realign.core.data import Prompt
from trace_realign.core.errors import DataError


@dataclass
class TruncationStats:
    """What an :class:`Encoder` had to cut. Prompt counters count distinct prompts (a prompt is
    encoded once and cached); ``turns_dropped`` counts messages; ``sequences`` counts every sequence.

    - ``prompts_truncated``: prompts over ``max_prompt_length`` (each also counts in one or more of
      the next four);
    - ``turns_dropped``: older non-system messages dropped whole;
    - ``system_truncated``: prompts whose system message was shortened or removed;
    - ``last_turn_truncated``: prompts whose final message's text was cut;
    - ``prompts_hard_cut``: prompts whose template text alone exceeds the budget, so the ids were
      cut and only their end (the generation prompt) kept.
    """

    prompts_truncated: int = 0
    turns_dropped: int = 0
    system_truncated: int = 0
    last_turn_truncated: int = 0
    prompts_hard_cut: int = 0
    responses_truncated: int = 0
    sequences: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompts_truncated": self.prompts_truncated,
            "turns_dropped": self.turns_dropped,
            "system_truncated": self.system_truncated,
            "last_turn_truncated": self.last_turn_truncated,
            "prompts_hard_cut": self.prompts_hard_cut,
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


def _head(messages: Sequence[dict[str, str]]) -> str:
    return repr(str(messages[0].get("content", "")) if messages else "")[:60]


def _line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    if not _has_template(tokenizer):
        return "\n\n".join(m["content"] for m in messages) + ("\n" if add_generation_prompt else "")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:
        from jinja2 import TemplateError

        if isinstance(exc, TemplateError):  # e.g. a template that demands alternating roles
            head = _head(messages)
            raise DataError(f"the chat template rejects the conversation starting {head}: {_line(exc)}") from None
        raise


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it before its answer (chat template + generation prompt).

    A tokenizer without a chat template (a base model) gets the plain text of the messages, joined
    by blank lines and ending with a newline. This is text for display and length estimates: encode
    with :func:`encode_chat`, which keeps control-token text in the messages from becoming tokens.
    """
    return _render(tokenizer, as_messages(prompt))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` as plain text: special-token text in it becomes ordinary sub-word tokens."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if text else []


@lru_cache(maxsize=64)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so a token wins over the tokens it contains.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)")


def _specials(tokenizer) -> tuple[re.Pattern, frozenset[int]]:
    """A regex matching the text of any special token, and the special tokens' ids."""
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return _pattern(tuple(sorted(set(special.values())))), frozenset(special)


def _map_text(messages: list[dict[str, str]], fn: Callable[[str], str]) -> list[dict[str, str]]:
    return [{k: fn(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]


def encode_chat(tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's chat template, data text kept as text.

    ``messages`` is a list of ``{"role", "content"}`` dicts. The chat template's own special tokens
    (turn markers, BOS where the template writes one) are encoded as those tokens; the special-token
    text that appears in the messages (a content holding ``<|im_end|>\\n<|im_start|>system``, a role
    holding ``<|endoftext|>``) is encoded as ordinary text, with the tokenizer's
    ``split_special_tokens=True``. A chat without special-token text in its messages gets exactly
    ``tokenizer(apply_chat_template(..., tokenize=False), add_special_tokens=False)``. Otherwise the
    rendered chat is cut at the template's special tokens only and the text between two of them
    (template text and message text together, so sub-words merge as in the plain text) is encoded
    with ``split_special_tokens=True``; where this tokenizer encodes text after a special token
    differently from text on its own (checked on the same chat), transformers'
    ``apply_chat_template(..., sanitize_control_tokens=True)`` does the encoding instead. Either way
    the result holds exactly the special tokens the template writes.

    Added tokens that are not special are left to the tokenizer (it matches them in plain text too).
    A tokenizer without a chat template gets the messages' text joined by blank lines (and a final
    newline when ``add_generation_prompt``), all of it encoded as text, after its BOS if it has one.

    Returns a list of ints (no batch dimension). Raises :class:`~trace_realign.core.errors.DataError` when the
    template rejects the conversation (e.g. roles that do not alternate) or when the data text cannot
    be encoded without a special token (the tokenizer makes one from plain text).
    """
    messages = [dict(m) for m in messages]
    if not _has_template(tokenizer):
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + _text_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt))
    rendered = _render(tokenizer, messages, add_generation_prompt)
    specials, special_ids = _specials(tokenizer)
    if not any(specials.search(v) for m in messages for v in m.values() if isinstance(v, str)):
        return _ids(tokenizer, rendered)
    # How many special tokens the template itself writes: render with the special text replaced by
    # a private-use character (removing it could join the text around it into a new one).
    blanked = _map_text(messages, lambda v: specials.sub("\U000f0000", v))
    expected = len(specials.findall(_render(tokenizer, blanked, add_generation_prompt)))
    failure = (
        f"the conversation starting {_head(messages)} holds special-token text that this tokenizer cannot encode"
        " as plain text"
    )
    ids = _encode_marked(tokenizer, messages, rendered, specials, add_generation_prompt)
    if ids is None:
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, sanitize_control_tokens=True, return_dict=False
            )
        except (ValueError, NotImplementedError) as exc:  # transformers: "Can't sanitize ..."
            raise DataError(f"{failure} ({_line(exc)})") from None
    if sum(1 for i in ids if i in special_ids) != expected:
        raise DataError(failure)
    return list(ids)


def _encode_marked(
    tokenizer, messages: list[dict[str, str]], rendered: str, specials: re.Pattern, add_generation_prompt: bool
) -> list[int] | None:
    """The chat's ids with the special tokens of the messages encoded as text, or None where this way
    cannot be trusted for this tokenizer and template (then the caller uses transformers' own)."""
    # Wrap each special token in the messages in two characters that occur nowhere (private use),
    # render, and cut the rendered text only at the special tokens left unwrapped: the template's.
    used = rendered + "".join(v for m in messages for v in m.values() if isinstance(v, str))
    free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)
    start, end = next(free), next(free)
    wrapped = _map_text(messages, lambda v: specials.sub(lambda t: start + t.group(0) + end, v))
    marked = _render(tokenizer, wrapped, add_generation_prompt)
    if marked.replace(start, "").replace(end, "") != rendered:
        return None  # the template transforms the text in a way the markers disturb
    parts = re.split(f"{re.escape(start)}({specials.pattern}){re.escape(end)}|({specials.pattern})", marked)
    # parts: text, data token, template token, text, data token, template token, ..., text
    ids: list[int] = []
    text = ""
    for k, part in enumerate(parts):
        if k % 3 == 2 and part is not None:  # a template token: encode the text before it, then the token
            ids += _text_ids(tokenizer, text) + [tokenizer.convert_tokens_to_ids(part)]
            text = ""
        elif part is not None:
            if k % 3 == 0 and (start in part or end in part):
                return None  # the template split a marked token
            text += part
    ids += _text_ids(tokenizer, text)
    # The cut above is faithful if encoding the text between special tokens on its own gives what
    # the tokenizer gives in context (true of byte-level BPE; not of SentencePiece tokenizers that
    # add a prefix space only at the start of the whole text): check on this very chat.
    plain = re.split(f"({specials.pattern})", rendered)
    piecewise: list[int] = []
    for k, p in enumerate(plain):
        piecewise += [tokenizer.convert_tokens_to_ids(p)] if k % 2 else _text_ids(tokenizer, p)
    return ids if piecewise == _ids(tokenizer, rendered) else None


def _prefix_cutter(tokenizer, text: str) -> tuple[int, Callable[[int], str]]:
    """(number of tokens of ``text`` as plain text, k -> the start of ``text`` that covers its first k tokens)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except NotImplementedError:  # a Python tokenizer has no offsets: decode the first k tokens instead
        ids = _text_ids(tokenizer, text)
        return len(ids), lambda k: tokenizer.decode(ids[:k])
    ends = list(itertools.accumulate((e for _, e in offsets), max, initial=0))
    return len(offsets), lambda k: text[: ends[k]]


def _cache_key(prompt: Prompt) -> str | tuple:
    # A text and a conversation never share a key (the repr of a conversation is a valid text prompt).
    return prompt if isinstance(prompt, str) else tuple(tuple(sorted(m.items())) for m in prompt)


class Encoder:
    """Encodes prompts and responses for one tokenizer and length budget (in tokens)."""

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
        self._prompt_cache: dict[str | tuple, list[int]] = {}

    def prompt(self, prompt: Prompt) -> list[int]:
        """Prompt token ids (:func:`encode_chat`, generation prompt included), at most
        ``max_prompt_length``. A plain string is one user turn.

        An over-long prompt keeps the end of the conversation, always a whole rendering of the chat
        template: (1) the oldest non-system messages are dropped, the first then again until the
        conversation starts with a user turn (so templates that check alternation accept it), until
        it fits or only the final message is left; (2) the system message's text is shortened,
        keeping its start, or removed when not one token of it fits (the message is dropped, or
        kept empty where that renders shorter, as with templates that insert a default system
        prompt when none is given); (3) the final message's text is cut, keeping its start (where a
        single request usually states what it asks), as far as an empty text; (4) only when the
        template's own text exceeds the budget are the ids of the last rendering cut, keeping their
        end (the generation prompt). Each step is counted in :attr:`stats`.
        """
        key = _cache_key(prompt)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        messages = as_messages(prompt)
        ids = encode_chat(self.tokenizer, messages)
        if len(ids) > self.max_prompt_length:
            self.stats.prompts_truncated += 1
            ids = self._truncate_prompt(messages)
        self._prompt_cache[key] = ids
        return ids

    def _fits(self, ids: list[int]) -> bool:
        return len(ids) <= self.max_prompt_length

    def _truncate_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        def encode(ms: list[dict[str, str]]) -> list[int]:
            return encode_chat(self.tokenizer, ms)

        system = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        # (1) Drop the oldest turns; the conversation restarts on a user turn.
        while len(turns) > 1:
            turns = turns[1:]
            self.stats.turns_dropped += 1
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
                self.stats.turns_dropped += 1
            ids = encode(system + turns)
            if self._fits(ids):
                return ids
        # (2) Shorten the system message; when none of its text fits, remove it.
        if system:
            self.stats.system_truncated += 1
            ids = self._cut_text(system + turns, 0, min_keep=1)
            if ids is not None:
                return ids
            emptied = [{**system[0], "content": ""}] + turns
            emptied_ids, ids = encode(emptied), encode(turns)
            if len(emptied_ids) < len(ids):
                turns, ids = emptied, emptied_ids
            if self._fits(ids):
                return ids
        # (3) Cut the final message's text, keeping its start.
        self.stats.last_turn_truncated += 1
        ids = self._cut_text(turns, len(turns) - 1, min_keep=0)
        if ids is not None:
            return ids
        # (4) The template's own text is over budget: keep the end, so the generation prompt survives.
        self.stats.prompts_hard_cut += 1
        return encode(turns)[-self.max_prompt_length :]

    def _cut_text(self, messages: list[dict[str, str]], index: int, min_keep: int) -> list[int] | None:
        """Ids of ``messages`` with message ``index``'s text cut to its longest start (at least
        ``min_keep`` tokens) that fits the budget; None when none fits."""
        text = messages[index]["content"]
        n, cut = _prefix_cutter(self.tokenizer, text)
        trial = [dict(m) for m in messages]
        # Estimate from the length of the whole text; token boundaries can shift when text is cut and
        # tokenized again, so shrink until it fits.
        keep = min(n - 1, self.max_prompt_length - (len(encode_chat(self.tokenizer, messages)) - n))
        while keep >= min_keep:
            trial[index]["content"] = cut(keep)
            ids = encode_chat(self.tokenizer, trial)
            if self._fits(ids):
                return ids
            keep -= max(1, len(ids) - self.max_prompt_length)
        return None

    def response(self, response: str) -> list[int]:
        """Response token ids ending with exactly one EOS.

        The text is encoded as plain text (special-token text in it becomes ordinary sub-word
        tokens, never a control token), except that a trailing run of the EOS token's own text
        (with any white space after it, e.g. ``"...<|im_end|>\\n"``) is taken off first: data sets
        that end every response with it get one EOS, not two.
        """
        eos_text = self.tokenizer.eos_token
        if eos_text:
            response = re.sub(f"(?:{re.escape(eos_text)}\\s*)+\\Z", "", response)
        return _text_ids(self.tokenizer, response) + [self.tokenizer.eos_token_id]

    def sequence(self, prompt: Prompt, response: str) -> EncodedSequence:
        """Prompt then response, at most ``max_length`` tokens: the response is cut at the end."""
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
