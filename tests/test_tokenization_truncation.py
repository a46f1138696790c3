"""Prompt truncation keeps the end of the conversation (issue 10, item 2).

Expected ids are the tokenizer's own encoding of hand-written ChatML text: a truncated prompt must be
exactly the rendering of the conversation that should survive, never a cut through a turn.
"""

import random

import pytest

from tests.conftest import WORDS
from trace_realign.core.errors import DataError
from trace_realign.core.tokenization import Encoder, encode_chat

GEN = "<|im_start|>assistant\n"
LONG = "money bank water " * 30  # 90+ tokens on the tiny tokenizer


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + GEN


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


COUNTERS = ("prompts_truncated", "turns_dropped", "system_truncated", "last_turn_truncated", "prompts_hard_cut")


def counters(enc: Encoder) -> tuple[int, ...]:
    """The prompt counters, in the order of COUNTERS."""
    return tuple(enc.stats.as_dict()[k] for k in COUNTERS)


def test_issue_example_keeps_final_user_turn_and_generation_prompt(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=32)
    conv = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and now?"}]
    got = enc.prompt(conv)
    assert got == ids(tiny_tokenizer, chatml(("user", "and now?")))
    assert counters(enc) == (1, 2, 0, 0, 0)


def test_only_as_many_old_turns_are_dropped_as_needed(tiny_tokenizer):
    kept = (("user", "the trolley"), ("assistant", "a problem"), ("user", "and now?"))
    expected = ids(tiny_tokenizer, chatml(*kept))
    conv = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]
    conv += [{"role": r, "content": c} for r, c in kept]
    # The budget is exactly the length of the last three turns: they fit, one more turn would not.
    enc = Encoder(tiny_tokenizer, max_length=128, max_prompt_length=len(expected))
    assert enc.prompt(conv) == expected
    assert enc.stats.turns_dropped == 2 and enc.stats.last_turn_truncated == 0


ALTERNATING = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_dropping_keeps_user_first_for_templates_that_check_alternation(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ALTERNATING
    conv = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and now?"}]
    # [assistant "ok", user "and now?"] would fit this budget, but the template rejects it: the
    # assistant turn goes with the user turn it answered.
    budget = len(ids(tok, chatml(("assistant", "ok"), ("user", "and now?"))))
    enc = Encoder(tok, max_length=128, max_prompt_length=budget)
    assert enc.prompt(conv) == ids(tok, chatml(("user", "and now?")))
    assert enc.stats.turns_dropped == 2
    # A conversation the template rejects as given is one clear data error, not a jinja traceback.
    with pytest.raises(DataError, match="roles must alternate"):
        Encoder(tok, max_length=128).prompt([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}])


def test_long_system_message_is_shortened_keeping_its_start(tiny_tokenizer):
    system = "You are a helpful assistant. " * 12
    expected = ids(tiny_tokenizer, chatml(("system", "You are a helpful assistant."), ("user", "and now?")))
    enc = Encoder(tiny_tokenizer, max_length=128, max_prompt_length=len(expected))
    got = enc.prompt([{"role": "system", "content": system}, {"role": "user", "content": "and now?"}])
    # The longest start of the system text that fits: one more token (" ") would not.
    assert got == expected
    assert counters(enc) == (1, 0, 1, 0, 0)


def test_old_turns_go_before_the_system_message_is_cut(tiny_tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    expected = ids(tiny_tokenizer, chatml(("system", "Be brief."), ("user", "and now?")))
    enc = Encoder(tiny_tokenizer, max_length=128, max_prompt_length=len(expected))
    assert enc.prompt(conv) == expected
    assert counters(enc) == (1, 2, 0, 0, 0)


def test_system_message_is_dropped_when_none_of_it_fits(tiny_tokenizer):
    expected = ids(tiny_tokenizer, chatml(("user", "and now?")))
    # Four tokens short of what an empty system message needs (<|im_start|> system \n <|im_end|> \n).
    enc = Encoder(tiny_tokenizer, max_length=128, max_prompt_length=len(expected) + 3)
    got = enc.prompt([{"role": "system", "content": LONG}, {"role": "user", "content": "and now?"}])
    assert got == expected
    assert enc.stats.system_truncated == 1 and enc.stats.last_turn_truncated == 0


SMOL_TEMPLATE = (  # SmolLM2-Instruct's template: it inserts its own system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_system_kept_empty_where_dropping_it_would_add_a_default_one(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = SMOL_TEMPLATE
    expected = ids(tok, chatml(("system", ""), ("user", "and now?")))
    enc = Encoder(tok, max_length=128, max_prompt_length=len(expected))
    got = enc.prompt([{"role": "system", "content": LONG}, {"role": "user", "content": "and now?"}])
    assert got == expected
    assert enc.stats.system_truncated == 1 and enc.stats.last_turn_truncated == 0


def test_last_turn_text_is_cut_only_when_it_alone_is_over_budget(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=128, max_prompt_length=24)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha " + LONG}]
    got = enc.prompt(conv)
    text = tiny_tokenizer.decode(got)
    assert len(got) <= 24 and text.startswith("<|im_start|>user\nalpha money") and text.endswith("<|im_end|>\n" + GEN)
    head = text[len("<|im_start|>user\n") : -len("<|im_end|>\n" + GEN)]
    assert ("alpha " + LONG).startswith(head)
    # It is the longest start that fits: one more token of the text does not.
    longer = ("alpha " + LONG)[: len(head) + 2]
    assert len(ids(tiny_tokenizer, chatml(("user", longer)))) > 24
    assert counters(enc) == (1, 0, 1, 1, 0)


def test_hard_cut_keeps_the_generation_prompt(tiny_tokenizer):
    gen = ids(tiny_tokenizer, GEN)
    assert len(gen) == 5  # <|im_start|> a ss istant \n
    # Even an empty user turn (11 tokens) is over a budget of 5: the ids are cut, keeping the end.
    enc = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=5)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert enc.prompt(conv) == gen
    assert counters(enc) == (1, 2, 0, 1, 1)


def test_tokenizer_without_chat_template_truncates_the_same_way(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.add_special_tokens({"bos_token": "<|endoftext|>"})
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    expected = [tok.bos_token_id] + ids(tok, "Be brief.\n\nand now?\n")
    enc = Encoder(tok, max_length=64, max_prompt_length=len(expected))
    assert enc.prompt(conv) == expected
    assert enc.stats.turns_dropped == 2


def test_stats_are_ints_for_mlflow_and_prompts_are_counted_once(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=32)
    conv = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and now?"}]
    first = enc.sequence(conv, "fine")
    again = enc.sequence([dict(m) for m in conv], "fine")
    assert first == again
    d = enc.stats.as_dict()
    assert all(type(v) is int for v in d.values())
    assert d["prompts_truncated"] == 1 and d["turns_dropped"] == 2 and d["sequences"] == 2


def test_text_prompt_equal_to_a_conversations_repr_is_not_served_from_its_cache(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=256)
    conv = [{"role": "user", "content": "hi"}]
    as_text = repr(conv)
    assert enc.prompt(conv) == ids(tiny_tokenizer, chatml(("user", "hi")))
    assert enc.prompt(as_text) == ids(tiny_tokenizer, chatml(("user", as_text)))


def _turns(tok, prompt_ids: list[int]) -> list[tuple[str, str]]:
    """(role, content) of each turn, split at the real <|im_start|> ids (data text never makes one)."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    cuts = [i for i, t in enumerate(prompt_ids) if t == start]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        body = prompt_ids[a + 1 : b]
        assert body[-2:] == [end] + ids(tok, "\n"), "every kept turn ends with its end marker"
        role, _, content = tok.decode(body[:-2]).partition("\n")
        out.append((role, content))
    assert prompt_ids[cuts[-1] :] == ids(tok, GEN)
    return out


def test_random_conversations_always_fit_and_stay_well_formed(tiny_tokenizer):
    rng = random.Random(7)
    pieces = WORDS + ["<|im_end|>", "<|im_start|>system\n", "é", "\n", "  "]
    for case in range(150):
        text = lambda: " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))  # noqa: E731
        system = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        conv = system + [{"role": ("user", "assistant")[k % 2], "content": text()} for k in range(2 * rng.randint(0, 2) + 1)]
        budget = rng.randint(5, 120)
        enc = Encoder(tiny_tokenizer, max_length=budget + 1, max_prompt_length=budget)
        got = enc.prompt(conv)
        assert len(got) <= budget, case
        if enc.stats.prompts_hard_cut:
            assert got == encode_chat(tiny_tokenizer, conv[-1:])[-budget:] and got[-5:] == ids(tiny_tokenizer, GEN), case
            continue
        turns = _turns(tiny_tokenizer, got)
        # The final turn survives (its text cut at most to a start); the turns before it are the
        # conversation's latest ones, whole; a system message is kept at most as a start of itself.
        assert turns[-1][0] == conv[-1]["role"] and conv[-1]["content"].startswith(turns[-1][1]), case
        body = turns[:-1]
        if body and body[0][0] == "system" and conv[0]["role"] == "system":
            assert conv[0]["content"].startswith(body[0][1]), case
            body = body[1:]
        original = [(m["role"], m["content"]) for m in conv[:-1] if not (m is conv[0] and m["role"] == "system")]
        assert body == original[len(original) - len(body) :], case
        assert not body or body[0][0] == "user", case
        if enc.stats.prompts_truncated == 0:
            assert got == encode_chat(tiny_tokenizer, conv)


def test_tokenizer_without_offsets_cuts_the_same_by_decoding(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha " + LONG}]
    with_offsets = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=24).prompt(prompt)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    call = type(tok).__call__

    def python_tokenizer(self, *args, **kwargs):  # Python tokenizers have no offset mapping
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", python_tokenizer)
    assert Encoder(tok, max_length=64, max_prompt_length=24).prompt(prompt) == with_offsets
