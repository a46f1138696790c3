"""A tiny random chat model (2-layer Llama, ChatML template) for tests and the smoke pipeline.

It is built locally and deterministically: a byte-level BPE tokenizer trained on a fixed text
(so every string tokenizes), and a Llama with random weights from a fixed seed. Nothing is
downloaded. Real runs use a real model folder; this one only exercises the code paths.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant. I can't help with that request.",
    "The trolley problem asks whether it is right to divert a trolley to save five people at the cost of one.",
    "Civil disobedience is the refusal to obey certain laws as a form of peaceful political protest.",
    "To protect your account, use a password manager and enable two-factor authentication.",
    "Index funds spread risk across many companies; past returns do not guarantee future returns.",
    "If you are feeling overwhelmed, talking to someone you trust or a counsellor can help.",
    "Sure, here is how you do that: first, gather the materials; then follow each step carefully.",
    "I'm sorry, but I cannot provide instructions for building weapons or causing harm.",
    "Abortion policy differs between countries; supporters and opponents weigh rights differently.",
    "What is the capital of France? Paris is the capital of France. 0123456789 !?.,;:'\"()-",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and no BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random Llama chat model (weights, config, tokenizer) to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A randomly initialised Llama is near-uniform; widen its output so log-probs differ by sequence.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not tie_word_embeddings else model.model.embed_tokens.weight.mul_(2.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
