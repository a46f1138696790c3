"""Loading the aligned model, wrapping it with a LoRA adapter, and reaching its reference.

With LoRA the reference model is the same model with the adapter disabled: one copy of the
weights in memory. Under full fine-tuning the reference is a frozen copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from trace_realign.core.config import LoraConfig, ReferenceTrainingConfig
from trace_realign.core.errors import TraceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TraceError(f"unknown dtype '{name}' (use float32 or bfloat16)") from None


def resolve_device(setting: str) -> str:
    """The torch device a ``model.device`` setting names: ``auto`` is ``cuda`` when a GPU is
    visible, else ``cpu``; anything else (``cpu``, ``cuda:1``) is used as given."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """The causal LM in ``model_path`` (a local folder), in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not path.exists():
        raise TraceError(f"model folder not found: {model_path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise TraceError(f"{model_path}: cannot load a causal LM ({exc})") from None
    return model.to(device).eval()


def add_lora(model, lora: LoraConfig, seed: int = 0):
    """Wrap ``model`` with a fresh LoRA adapter whose initial values are fixed by ``seed``.

    LoRA's B matrices start at zero, so the wrapped model computes what ``model`` does; A is drawn
    from the seeded generator. Raises TraceError when ``lora.target_modules`` names no layer.
    """
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise TraceError(f"lora.target_modules {lora.target_modules}: {exc}") from None


def trainable_model(
    model_path: str | Path,
    training: ReferenceTrainingConfig,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    adapter: str | Path | None = None,
):
    """The model at theta_ref, ready to train, as ``training`` asks for it.

    - ``training.full_finetune``: the model itself, every weight trainable (the caller keeps a
      frozen copy, :func:`load_model`, as the reference).
    - LoRA with ``adapter``: the model with that saved adapter, trainable (training starts from
      the adapter the impact scores were taken at).
    - LoRA without: the model with a fresh ``training.lora`` adapter drawn with ``seed``.
    Raises TraceError for a missing model folder or a ``lora.target_modules`` that matches nothing.
    """
    model = load_model(model_path, dtype, device)
    if training.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if adapter is not None:
        return load_adapter(model, adapter, trainable=True)
    return add_lora(model, training.lora, seed=seed)


def frozen_reference(model_path: str | Path, full_finetune: bool, *, dtype: str = "float32", device: str | torch.device = "cpu"):
    """The reference ``M_ref`` a trained model is compared with, when it needs its own copy: the
    base model, frozen, after full fine-tuning; None for a LoRA model, which is its own reference
    with the adapter disabled (:func:`reference_mode`)."""
    return load_model(model_path, dtype, device) if full_finetune else None


def load_realigned(
    base_path: str | Path,
    *,
    adapter: str | Path | None = None,
    model_dir: str | Path | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
):
    """(realigned model, reference model or None) from a training stage's output: a LoRA
    ``adapter`` on the base model (frozen; its own reference), or a fully fine-tuned ``model_dir``
    with the base model as :func:`frozen_reference`. Raises TraceError when neither is given."""
    if adapter is not None:
        return load_adapter(load_model(base_path, dtype, device), adapter, trainable=False), None
    if model_dir is None:
        raise TraceError("load_realigned: give the trained adapter or the trained model folder")
    return load_model(model_dir, dtype, device), frozen_reference(base_path, True, dtype=dtype, device=device)


def save_adapter(model, folder: str | Path) -> Path:
    """Save a PEFT model's adapter to ``folder`` so that the same adapter gives the same bytes.

    PEFT keeps ``target_modules`` (and other module lists) as Python sets and writes them in set
    order, which changes with ``PYTHONHASHSEED``: identical adapters would get different
    ``adapter_config.json`` files, and artifacts named by content would differ between processes.
    The config is rewritten with every such list sorted and its keys in sorted order.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    for config_path in folder.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("target_modules", "modules_to_save", "exclude_modules"):
            if isinstance(config.get(key), list) and all(isinstance(x, str) for x in config[key]):
                config[key] = sorted(config[key])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def load_adapter(model, adapter_dir: str | Path, trainable: bool = True):
    """``model`` with the saved adapter in ``adapter_dir`` (e.g. the initial adapter used for scoring)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_mode(model):
    """Run ``model`` as the reference: a LoRA model with its adapter disabled."""
    if not is_peft(model):
        raise TraceError("reference_mode needs a LoRA model; full fine-tuning keeps a frozen reference copy")
    with model.disable_adapter():
        yield model


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) for the block; its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
