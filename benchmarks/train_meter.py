"""Measuring training steps, one configuration per child process: the scaffolding of train_step.py.

A parent calls :func:`run_child` per configuration; the child (the same script started with
``--child SPEC``) reads its settings with :func:`read_spec`, trains under a :class:`TokenMeter` and
a :func:`step_timer_callback`, and hands :func:`summarize`'s dict to :func:`write_result`. Each
configuration running in a fresh process makes its peak resident memory its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import Stopwatch, run_checked, synchronize


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class TokenMeter:
    """Counts the non-padding tokens of every forward run with gradients (the training forwards)."""

    def __init__(self, model):
        self.tokens: list[int] = []
        self.widths: list[tuple[int, int]] = []
        self.batches: list[list[tuple[int, ...]]] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        if not torch.is_grad_enabled():
            return None
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None:
            mask = torch.ones_like(ids)
        self.tokens.append(int(mask.sum()))
        self.widths.append(tuple(ids.shape))
        self.batches.append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)])
        return None


@dataclass
class Measured:
    """What a configuration hands back: step end times (times[0]: train begin), its meter, extra fields."""

    times: list[float]
    meter: TokenMeter
    extra: dict = field(default_factory=dict)


def step_timer_callback(times: list[float]):
    """A TrainerCallback appending ``time.perf_counter()`` at train begin and at each step's end
    (on a GPU after the step's queued kernels finished: :func:`common.synchronize`)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter())

    return StepTimer()


def summarize(name: str, run: Measured, warmup: int, steps: int) -> dict:
    """Tokens/s over the timed span (end of step ``warmup`` .. end of the last step) and per-step detail.

    Raises RuntimeError when the run made another number of steps or training forwards than
    ``warmup + steps``.
    """
    times, meter = run.times, run.meter
    n_steps = len(times) - 1
    if n_steps != warmup + steps or len(meter.tokens) != n_steps:
        raise RuntimeError(f"{name}: {n_steps} steps and {len(meter.tokens)} training forwards, expected {warmup + steps}")
    span = times[-1] - times[warmup]
    tokens = sum(meter.tokens[warmup:])
    return {
        "name": name,
        "tokens_per_s": tokens / span,
        "timed_tokens": tokens,
        "timed_seconds": span,
        "step_seconds": [round(b - a, 3) for a, b in zip(times[:-1], times[1:])],
        "tokens_per_step": meter.tokens,
        "batch_shapes": meter.widths,
        **run.extra,
    }


def read_spec(spec_path: Path) -> argparse.Namespace:
    """The child's side: the settings the parent wrote (its CLI options, plus ``config``)."""
    return argparse.Namespace(**json.loads(Path(spec_path).read_text()))


def write_result(spec_path: Path, result: dict) -> None:
    """The child's side: hand the run's summary back to :func:`run_child` (result.json beside the spec)."""
    (Path(spec_path).parent / "result.json").write_text(json.dumps(result))


def run_child(script: str | Path, config: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` for ``config`` in a fresh process and return the summary it wrote.

    ``spec`` (JSON-ready) is what the child reads back with :func:`read_spec`, ``config`` added. The
    summary gains ``process_wall_seconds``; a line with its rate, peak RSS and load average is
    printed. Exits with the child's output tail when it fails.
    """
    with tempfile.TemporaryDirectory(prefix=f"train-step-{config}-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({**spec, "config": config}))
        with Stopwatch() as wall:
            run_checked([sys.executable, str(script), "--child", str(spec_path)], f"child '{config}'")
        result = json.loads((Path(tmp) / "result.json").read_text())
    result["process_wall_seconds"] = wall.seconds
    print(
        f"  {config:<8} done in {wall.seconds:6.1f} s: {result['tokens_per_s']:8.1f} tok/s, "
        f"peak RSS {result['peak_rss_mb']:7.0f} MB, load avg {result['loadavg']}",
        flush=True,
    )
    return result
