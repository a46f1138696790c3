"""The vLLM venv the vLLM tests run in (.venv-vllm, made by ``bash scripts/setup.sh --vllm``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on a CPU (vLLM's default takes far more)
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Offline, no usage reports, a small CPU KV cache."""


def vllm_python() -> Path:
    """The vLLM venv's python; fails the test (no skip: CI makes the venv) when it is missing."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: create it with `bash scripts/setup.sh --vllm` (README's test command does)")
    return VLLM_PYTHON


def vllm_env() -> dict[str, str]:
    """This process's environment with :data:`VLLM_ENV` over it."""
    return {**os.environ, **VLLM_ENV}
