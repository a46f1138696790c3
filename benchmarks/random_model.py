"""A model folder with a real model's architecture and tokenizer but random weights, for timing.

Speed and memory depend on the architecture, the sequence lengths and the tokenizer, not on the
weights' values, so a benchmark on a machine that cannot hold (or receive) the real weights times
a randomly initialised copy instead: this script copies the tokenizer files and ``config.json`` of
``--from`` (a local model folder, e.g. the prepared SmolLM2-135M-Instruct), optionally resizes the
architecture (``--hidden-size`` ... ``--kv-heads``, e.g. to SmolLM2-1.7B's), initialises the weights
with ``--seed`` and saves a plain safetensors folder at ``--out`` in ``--dtype``.

    python benchmarks/random_model.py --from DIR --out DIR [--hidden-size 2048 --intermediate-size 8192
        --layers 24 --heads 32 --kv-heads 32] [--dtype bfloat16] [--seed 0]

The last line is ``random_model_params=<number of parameters>``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import offline_environment, print_metric

offline_environment()

RESIZE = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
}
"""CLI option (dest) -> the transformers config field it sets."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="source", type=Path, required=True, help="model folder whose config and tokenizer are copied")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    for option in RESIZE:
        ap.add_argument(f"--{option.replace('_', '-')}", dest=option, type=int, help=f"sets config.{RESIZE[option]}")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.source / "config.json").is_file():
        raise SystemExit(f"--from {args.source}: no config.json there")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.source)
    for option, field in RESIZE.items():
        if getattr(args, option) is not None:
            setattr(config, field, getattr(args, option))
    if config.hidden_size % config.num_attention_heads:
        raise SystemExit(f"--hidden-size {config.hidden_size} is not a multiple of --heads {config.num_attention_heads}")
    if hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.source / name).is_file():
            shutil.copy2(args.source / name, args.out / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, random weights ({args.dtype})")
    print_metric("random_model_params", n, ".0f")


if __name__ == "__main__":
    main()
