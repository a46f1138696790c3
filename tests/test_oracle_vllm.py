"""The vllm judge: a clear error without vllm; a real run where vllm and a GPU are present."""

from __future__ import annotations

import importlib.util

import pytest

from trace_core.errors import TraceError
from trace_core.oracle import JudgeItem, make_judge
from trace_core.policy import parse_policy

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vllm is missing")
def test_missing_vllm_is_one_clear_error():
    with pytest.raises(TraceError, match=r"needs vllm.*pip install 'trace-realign\[vllm\]'"):
        make_judge({"backend": "vllm", "model": "any/model"})


def test_vllm_config_is_validated_without_importing_vllm():
    from trace_core.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu_memory_utilisation"):
        make_judge({"backend": "vllm", "model": "m", "gpu_memory_utilisation": 0.5})


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
def test_vllm_judges_the_tiny_model(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the vllm judge needs a GPU")
    from trace_core.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    judge = make_judge({"backend": "vllm", "model": str(model), "gpu_memory_utilization": 0.3, "enforce_eager": True})
    policy = parse_policy("Be helpful.")
    items = [JudgeItem(f"question {i}", f"answer {i}") for i in range(6)]
    verdicts = judge.judge(items, policy)
    assert len(verdicts) == 6
    for v in verdicts:
        # The single token is constrained to the two answers, so every verdict is known.
        assert v.compliant is not None and v.raw in ("Yes", "No")
        assert v.confidence is None or 0.0 <= v.confidence <= 1.0
    fixes = judge.correct(items[:2], policy)
    assert len(fixes) == 2
    judge.close()
