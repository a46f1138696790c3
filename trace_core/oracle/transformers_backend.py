"""The transformers judge: any local causal LM, on CPU or GPU.

For each item the judge chat (policy as system message, the question as user message; or both in
the user message, ``policy_placement``) is rendered with the tokenizer's chat template and
generation prompt. The placement is decided once, at construction: with "auto", a template that
refuses a system message (Gemma's raises "System role not supported") gets the policy in the user
message, said once in the log; any other template failure is one TraceError naming the model.

One forward pass per batch (left padding, explicit position ids so a padded row sees the same
positions as it would alone) gives the next-token logits; of those only the first tokens of the
question's answers matter (a softmax over them):

    p_yes = exp(l_yes) / (exp(l_yes) + exp(l_no)),  p_no = 1 - p_yes
    compliant = p_no >= 0.5,  confidence = max(p_yes, p_no)

("Yes" means violating; under the compliance question the answers are "Compliant" and
"Non-compliant", compliant when P(Compliant) >= 0.5). The answer never depends on what other
tokens the model prefers, so there are no unparsable answers; inputs longer than the model's
context give unknown verdicts. Comparisons (:meth:`TransformersJudge.compare`) read the first
tokens of "A", "B" and "tie" the same way and take the most probable (the first on a tie).
Corrections are sampled with ``generate``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trace_realign.core.errors import ConfigError, DataError, TraceError
from trace_realign.core.oracle.base import (
    PAIRWISE,
    Comparison,
    ComparisonItem,
    JudgeItem,
    LLMJudge,
    OnResult,
    Question,
    Verdict,
    choose_placement,
    one_line,
    template_errors,
)
from trace_realign.core.oracle.config import TransformersJudgeConfig
from trace_realign.core.policy import Policy
from trace_realign.core.tokenization import encode_chat, left_pad, length_batches

_MAX_SANE_CONTEXT = 1_000_000  # tokenizers without a limit report ~1e30


def _model_fingerprint(path: str) -> str:
    """A cheap stand-in for the weights' hash: config and tokenizer files by content, weight files by
    name, size and modification time (hashing many GB of weights would cost minutes)."""
    folder = Path(path)
    if not folder.is_dir():
        return path  # a hub id: its name is what identifies it
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if f.suffix in (".json", ".jinja", ".model", ".txt"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        else:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return f"{folder.name}@{h.hexdigest()[:8]}"


class TransformersJudge(LLMJudge):
    """Judge with a local causal LM by the next-token probabilities of "Yes" and "No"."""

    backend = "transformers"
    config: TransformersJudgeConfig

    def __init__(self, config: TransformersJudgeConfig, where: str = "judge", question: str = "violation"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(config, where, question)
        self.device = self._pick_device(config.device, torch, where)
        dtype = self._pick_dtype(config.dtype, self.device, torch)
        src = config.model_path
        if os.path.sep in src and not Path(src).exists():
            raise TraceError(f"{src}: judge model folder not found ({where}.model_path)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as exc:
            raise TraceError(f"{src}: cannot load the judge model: {one_line(exc, 200)}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise TraceError(f"{src}: the judge model's tokenizer has no chat template")
        # Decided before the weights load, so a template that fails costs no loading time.
        self.templates.placement = choose_placement(self._apply_template, config.policy_placement, src, where)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise TraceError(f"{src}: cannot load the judge model: {one_line(exc, 200)}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            # Left padding is masked out, so any id will do; EOS is always present.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.answer_ids = self._answer_token_ids(self.question)
        self.pairwise_ids = self._answer_token_ids(PAIRWISE)
        self.max_input_tokens = config.max_input_tokens or self._context_limit()
        self._fingerprint = _model_fingerprint(src)

    # -- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _pick_device(device: str, torch: Any, where: str = "judge") -> str:
        if device != "auto":
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"{where}.device: {device!r} asked for but no CUDA GPU is available")
            return device
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    @staticmethod
    def _pick_dtype(dtype: str, device: str, torch: Any) -> Any:
        if dtype != "auto":
            return getattr(torch, dtype)
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def _apply_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._apply_template(messages)
        except template_errors() as exc:
            raise TraceError(f"{self.config.model_path}: the judge model's chat template fails: {one_line(exc, 200)}") from None

    def _answer_token_ids(self, question: Question) -> tuple[int, ...]:
        """The first token of each of ``question``'s answers as the model would emit it right after
        the generation prompt (found by tokenizing prompt + answer, since some tokenizers merge a
        leading space). TraceError when two answers share their first token."""
        head = self._render([{"role": "user", "content": "?"}])
        head_ids = self.tokenizer(head, add_special_tokens=False).input_ids
        ids = []
        for answer in question.answers:
            full = self.tokenizer(head + answer, add_special_tokens=False).input_ids
            if len(full) > len(head_ids) and full[: len(head_ids)] == head_ids:
                ids.append(full[len(head_ids)])
            else:
                ids.append(self.tokenizer(answer, add_special_tokens=False).input_ids[0])
        if len(set(ids)) < len(ids):
            quoted = " and ".join(f"'{a}'" for a in question.answers)
            raise TraceError(f"{self.config.model_path}: the tokenizer gives {quoted} the same first token")
        return tuple(ids)

    def _context_limit(self) -> int:
        limit = getattr(self.tokenizer, "model_max_length", None)
        if not limit or limit > _MAX_SANE_CONTEXT:
            limit = getattr(self.model.config, "max_position_embeddings", None) or _MAX_SANE_CONTEXT
        return int(limit)

    # -- identity -----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._fingerprint

    def answer_settings(self) -> dict[str, Any]:
        return {"answer": "next-token"}

    # -- judging ------------------------------------------------------------------------------

    def _encode(self, chats: list[list[dict[str, str]]]) -> list[list[int] | str]:
        """Token ids per chat (:func:`~trace_realign.core.tokenization.encode_chat`: the judged text stays
        text, it cannot forge a turn of the judge chat), or why a chat cannot be encoded."""
        out: list[list[int] | str] = []
        for messages in chats:
            self._render(messages)  # a template failure is one line naming the model
            try:
                out.append(encode_chat(self.tokenizer, messages))
            except DataError as exc:
                out.append(f"judge input cannot be encoded: {exc}")
        return out

    def _fits(self, encoded: list[int] | str) -> bool:
        return not isinstance(encoded, str) and len(encoded) <= self.max_input_tokens

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        return length_batches(lengths, self.config.batch_size)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        return left_pad(seqs, self.tokenizer.pad_token_id, self.device)

    def _probabilities(
        self, chats: list[list[dict[str, str]]], token_ids: tuple[int, ...], on_batch: Any = None
    ) -> list[tuple[float, ...] | str | None]:
        """Per chat, the next-token probabilities of ``token_ids`` normalised over them; None for
        inputs longer than ``max_input_tokens``, the reason for inputs that cannot be encoded.
        ``on_batch(indices, probs)`` is called after each batch."""
        import torch

        encoded = self._encode(chats)
        out: list[tuple[float, ...] | str | None] = [e if isinstance(e, str) else None for e in encoded]
        fits = [i for i, e in enumerate(encoded) if self._fits(e)]
        for batch in self._batches([len(encoded[i]) for i in fits]):
            idx = [fits[b] for b in batch]
            ids, mask = self._left_pad([encoded[i] for i in idx])
            # Positions count real tokens only, so a left-padded row is computed exactly as alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
            probs = logits[:, -1, list(token_ids)].float().softmax(-1).cpu().tolist()
            for i, p in zip(idx, probs):
                out[i] = tuple(p)
            if on_batch is not None:
                on_batch(idx, [out[i] for i in idx])
        return out

    def answer_probabilities(
        self, items: Sequence[JudgeItem], policy: Policy, on_batch: Any = None
    ) -> list[tuple[float, ...] | str | None]:
        """The probabilities of the verdict question's answers per item ((p_yes, p_no) for the
        violation question, (p_compliant, p_non_compliant) for the compliance one), normalised over
        them; None for inputs longer than ``max_input_tokens``, the reason for inputs that cannot be
        encoded. ``on_batch(indices, probs)`` is called after each batch."""
        chats = [self.templates.judge_messages(it, policy) for it in items]
        return self._probabilities(chats, self.answer_ids, on_batch)

    def _unanswered(self, probs: str | None) -> str:
        return f"judge input is longer than max_input_tokens={self.max_input_tokens}" if probs is None else probs

    def _verdict(self, probs: tuple[float, ...] | str | None) -> Verdict:
        if probs is None or isinstance(probs, str):
            return Verdict.unknown(self._unanswered(probs))
        question = self.question
        p_compliant = sum(p for p, v in zip(probs, question.values) if v)
        compliant = p_compliant >= 0.5
        raw = question.answers[question.values.index(compliant)]
        return Verdict(compliant=compliant, confidence=max(p_compliant, 1.0 - p_compliant), raw=raw)

    def _report(self, on_result: OnResult | None, read: Any) -> Any:
        """``on_batch`` for :meth:`_probabilities` handing ``read(probs)`` of each item to ``on_result``."""

        def report(indices: list[int], probs: list[Any]) -> None:
            if on_result is not None:
                for i, p in zip(indices, probs):
                    on_result(i, read(p))

        return report

    def _answered(self, probs: list[Any], read: Any, on_result: OnResult | None) -> list[Any]:
        """``read(p)`` per item, handing those no batch reported (unanswerable inputs) to ``on_result``."""
        values = [read(p) for p in probs]
        if on_result is not None:
            for i, (p, v) in enumerate(zip(probs, values)):
                if p is None or isinstance(p, str):
                    on_result(i, v)
        return values

    def judge(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[Verdict]:
        probs = self.answer_probabilities(items, policy, on_batch=self._report(on_result, self._verdict))
        return self._answered(probs, self._verdict, on_result)

    def _comparison(self, probs: tuple[float, ...] | str | None) -> Comparison:
        if probs is None or isinstance(probs, str):
            return Comparison.unknown(self._unanswered(probs))
        best = max(range(len(probs)), key=lambda i: probs[i])
        return Comparison(winner=PAIRWISE.values[best], raw=PAIRWISE.answers[best])

    def compare(self, items: Sequence[ComparisonItem], policy: Policy, on_result: OnResult | None = None) -> list[Comparison]:
        """The most probable of "A", "B" and "tie" as the next token per item (``pairwise_template``)."""
        chats = [self.templates.comparison_messages(it, policy) for it in items]
        probs = self._probabilities(chats, self.pairwise_ids, on_batch=self._report(on_result, self._comparison))
        return self._answered(probs, self._comparison, on_result)

    # -- corrections --------------------------------------------------------------------------

    def correct(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[str | None]:
        """Sampled rewrites (temperature, max_correction_tokens, seed from the config); None where
        the input is too long or the model wrote nothing."""
        import torch

        c = self.config
        encoded = self._encode([self.templates.correction_messages(it, policy) for it in items])
        out: list[str | None] = [None] * len(items)
        fits = [i for i, e in enumerate(encoded) if self._fits(e)]
        sampling = {"do_sample": True, "temperature": c.temperature} if c.temperature > 0 else {"do_sample": False}
        # fork_rng: the seed makes corrections reproducible without touching the caller's RNG state.
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            if c.seed is not None:
                torch.manual_seed(c.seed)
            for batch in self._batches([len(encoded[i]) for i in fits]):
                idx = [fits[b] for b in batch]
                ids, mask = self._left_pad([encoded[i] for i in idx])
                with torch.inference_mode():
                    generated = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=c.max_correction_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **sampling,
                    )
                texts = self.tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = text.strip() or None
                    if on_result is not None:
                        on_result(i, out[i])
        if on_result is not None:
            for i in set(range(len(items))) - set(fits):
                on_result(i, None)
        return out

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()
