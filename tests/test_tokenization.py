import pytest
import torch

from trace_realign.core.tokenization import Encoder, pad_sequences, render_prompt


def test_prompt_uses_chat_template_with_generation_prompt(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "How do vaccines work?")
    assert text == "<|im_start|>user\nHow do vaccines work?<|im_end|>\n<|im_start|>assistant\n"
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_prompt(tiny_tokenizer, conv).startswith("<|im_start|>system\nS<|im_end|>")


def test_response_ends_with_exactly_one_eos(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=128)
    eos = tiny_tokenizer.eos_token_id
    plain = enc.response("Paris is the capital.")
    assert plain[-1] == eos and plain.count(eos) == 1
    # A response that already carries the EOS text must not get a second one (TRL's duplicate-EOS bug).
    already = enc.response("Paris is the capital.<|im_end|>")
    assert already == plain


def test_labels_cover_only_the_response(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=128)
    prompt, response = "Tell me about banks", "Banks lend money"
    seq = enc.sequence(prompt, response)
    prompt_ids = tiny_tokenizer(render_prompt(tiny_tokenizer, prompt), add_special_tokens=False)["input_ids"]
    assert list(seq.input_ids[: seq.response_start]) == prompt_ids
    batch = pad_sequences([seq, enc.sequence("hi", "a much longer answer about money and banks")], tiny_tokenizer.pad_token_id)
    labelled = batch.input_ids[0][batch.response_mask[0].bool()].tolist()
    # The labelled tokens decode to the response (plus EOS) and nothing of the prompt leaks in.
    assert tiny_tokenizer.decode(labelled) == response + tiny_tokenizer.eos_token
    assert batch.response_mask[0, : seq.response_start].sum() == 0
    # Padding is neither attended nor labelled.
    pad_from = len(seq.input_ids)
    assert batch.attention_mask[0, pad_from:].sum() == 0 and batch.response_mask[0, pad_from:].sum() == 0


def test_tokenizer_without_bos_adds_none(tiny_tokenizer):
    assert tiny_tokenizer.bos_token_id is None
    seq = Encoder(tiny_tokenizer, max_length=64).sequence("hi", "hello")
    assert seq.input_ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_template_bos_is_not_duplicated(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"bos_token": "<|endoftext|>"})
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    seq = Encoder(tok, max_length=64).sequence("hi", "hello")
    assert list(seq.input_ids).count(tok.bos_token_id) == 1 and seq.input_ids[0] == tok.bos_token_id


def test_truncation_keeps_prompt_start_and_never_drops_the_response(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_length=40, max_prompt_length=20)
    long_prompt = "alpha " + "money bank water " * 40
    seq = enc.sequence(long_prompt, "short answer")
    assert seq.response_start <= 20
    head = tiny_tokenizer.decode(seq.input_ids[: seq.response_start])
    assert head.startswith("<|im_start|>user\nalpha") and head.endswith("<|im_start|>assistant\n")
    assert seq.response_length >= 1
    assert tiny_tokenizer.decode(seq.input_ids[seq.response_start :]).startswith("short answer")
    long_response = enc.sequence("hi", "the model " * 100)
    assert len(long_response.input_ids) == 40
    assert tiny_tokenizer.decode(long_response.input_ids[long_response.response_start :]).startswith("the model")
    assert enc.stats.prompts_truncated == 1 and enc.stats.responses_truncated == 1 and enc.stats.sequences == 2


def test_bad_budgets_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError):
        Encoder(tiny_tokenizer, max_length=32, max_prompt_length=32)


def test_logps_of_padded_batch_equal_unpadded(tiny_model_dir, tiny_tokenizer):
    from trace_realign.core.logprobs import sequence_logps
    from trace_realign.core.modeling import load_model

    model = load_model(tiny_model_dir)
    enc = Encoder(tiny_tokenizer, max_length=128)
    seqs = [enc.sequence("hi", "a short one"), enc.sequence("tell me about the trolley problem", "a longer answer here")]
    with torch.no_grad():
        together = sequence_logps(model, pad_sequences(seqs, tiny_tokenizer.pad_token_id))
        alone = torch.cat([sequence_logps(model, pad_sequences([s], tiny_tokenizer.pad_token_id)) for s in seqs])
        # Brute force: sum of log softmax over the response positions, one token at a time.
        ids = torch.tensor([seqs[0].input_ids])
        logits = model(input_ids=ids).logits[0].log_softmax(-1)
        manual = sum(logits[t - 1, ids[0, t]].item() for t in range(seqs[0].response_start, ids.shape[1]))
    assert torch.allclose(together, alone, atol=1e-4)
    assert together[0].item() == pytest.approx(manual, abs=1e-4)
