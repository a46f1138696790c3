"""Benchmark: the same training on one process and on several (``training.num_processes``).

Trains a LoRA adapter (the authors' r 32, alpha 16, q_proj + v_proj, no dropout) from the same
initial adapter on the same synthetic INVERT/PUNISH pairs twice: in this process with
``per_device_batch_size = B * P``, and on P processes under the launcher with ``B`` each (the same
global batch, so the same optimizer steps). Reports each run's wall time (the P-process one
includes starting the ranks and loading the model in each), the Trainer's own training-loop
time, and the largest absolute difference between the two adapters' weights. Model:
SmolLM2-135M-Instruct when its package is installed, else the tiny random model.

Last lines: ``train_1proc_s``, ``train_nproc_s``, ``train_loop_1proc_s``, ``train_loop_nproc_s``
and ``train_max_abs_diff``.

    .venv/bin/python benchmarks/train_processes.py [--processes 2] [--pairs 32] [--steps 8] [--batch 2] [--max-length 128] [--model NAME|PATH] [--launcher torchrun|accelerate]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common import Stopwatch, choose_model, fresh_folder, offline_environment, pair_samples, print_metric, synthetic_pairs

offline_environment()

from safetensors.torch import load_file  # noqa: E402

from trace_realign.core.config import LoraConfig, TrainingConfig  # noqa: E402
from trace_realign.core.impact import reference_logps  # noqa: E402
from trace_realign.core.modeling import add_lora, load_model, load_tokenizer, save_adapter  # noqa: E402
from trace_realign.core.objective import SampleKind  # noqa: E402
from trace_realign.core.tokenization import Encoder  # noqa: E402
from trace_realign.core.training import TrainJob, run_training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=2, help="samples per process per step")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--model", default=None, help="smollm2-135m-instruct, tiny-random or a folder")
    ap.add_argument("--launcher", default="auto", choices=["auto", "torchrun", "accelerate"])
    args = ap.parse_args()

    name, path = choose_model(args.model)
    folder = fresh_folder("train-processes-")
    tokenizer = load_tokenizer(path)
    model = add_lora(load_model(path), LoraConfig(dropout=0.0), seed=0)
    save_adapter(model, folder / "init")
    encoder = Encoder(tokenizer, max_length=args.max_length)
    samples = pair_samples(encoder, synthetic_pairs(tokenizer, args.pairs, args.max_length, seed=1), [SampleKind.PREFER, SampleKind.PUNISH], "p")
    ref = reference_logps(model, samples, tokenizer.pad_token_id)
    samples = [replace(s, weight=1.0 / len(samples), ref_logps=(float(ref[i, 0]), float(ref[i, 1]))) for i, s in enumerate(samples)]
    del model
    print(f"model={name} pairs={len(samples)} steps={args.steps} global_batch={args.batch * args.processes} processes={args.processes}")

    def run(tag: str, per_device: int, processes: int):
        training = TrainingConfig(
            lora=LoraConfig(dropout=0.0), max_length=args.max_length, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant",
            max_steps=args.steps, per_device_batch_size=per_device, gradient_accumulation_steps=1, logging_steps=1,
            num_processes=processes, launcher=args.launcher,
        )  # fmt: skip
        job = TrainJob(str(path), training.model_dump(mode="json"), str(folder / tag), adapter=str(folder / "init"), progress=False)
        with Stopwatch() as t:
            out = run_training(job, samples)
        return t.seconds, out

    t1, one = run("one", args.batch * args.processes, 1)
    tn, many = run("many", args.batch, args.processes)
    a = load_file(Path(one.paths["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(many.paths["adapter"]) / "adapter_model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"1 process:   {t1:8.2f} s wall, {one.result.metrics['train_runtime']:8.2f} s in the training loop")
    print(f"{args.processes} processes: {tn:8.2f} s wall, {many.result.metrics['train_runtime']:8.2f} s in the training loop")
    print(f"largest adapter weight: {max(v.abs().max().item() for v in a.values()):.3e}")
    print_metric("train_1proc_s", t1, ".2f")
    print_metric("train_nproc_s", tn, ".2f")
    print_metric("train_loop_1proc_s", one.result.metrics["train_runtime"], ".2f")
    print_metric("train_loop_nproc_s", many.result.metrics["train_runtime"], ".2f")
    print_metric("train_max_abs_diff", diff, ".3e")


if __name__ == "__main__":
    main()
