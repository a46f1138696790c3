"""Benchmark: training throughput and peak memory of the TRACE trainer vs TRL's DPOTrainer.

Measures tokens per second and peak resident memory of these configurations, each in its own
child process (so each peak RSS is that configuration's own), with the same model, LoRA (r 32,
alpha 16, dropout 0.1 on q_proj + v_proj), pairs, batch size, max length, steps, learning rate,
fp32, no gradient checkpointing, gradient accumulation 1:

- ``trace``:    ``trace_realign.core.training.train`` on plain DPO pairs (all PREFER samples, uniform
                weights), reference log-probs precomputed once by ``trace_realign.core.impact.reference_logps``
                (TRACE's reference stage); the training step has no reference forward.
- ``trl``:      ``trl.DPOTrainer`` + ``DPOConfig`` + a peft ``LoraConfig`` on the same pairs (sigmoid loss,
                the same beta); TRL's default ``precompute_ref_log_probs=False``, so it runs a no-grad
                reference forward (adapter disabled, no second model copy) inside every training step.
- ``baseline``: one model copy with its activations: a plain loop of forward + backward + AdamW step of
                the same LoRA model on exactly the batches the ``trace`` run saw (the same loss graph,
                no reference pass, no Trainer). The memory floor for ``trace``.
- ``mixed`` (optional, ``--mixed``): ``trace_realign.core.training.train`` on a mixed TRACE batch (INVERT,
                PUNISH and RETAIN thirds) built by ``trace_realign.core.reference.run_reference_stage`` with
                impact weights; RETAIN samples need a no-grad reference forward for their KL (full distributions
                at RETAIN response tokens).

Tokens are the non-padding tokens (prompt + response, chosen + rejected) of the sequences that the
training forward of each step processed, counted the same way for every trainer: a forward pre-hook
on the PEFT model sums ``attention_mask`` of every forward run with gradients enabled. The first
``--warmup`` steps are not timed; the timed span runs from the end of the last warm-up step to the
end of the last step (data collation, forward, backward, optimizer, logging: the whole step).
TRACE and TRL alternate for ``--repeats`` rounds and each configuration keeps its best round.

Target: TRACE's step at least as fast as TRL's and its peak memory at the floor of one LoRA model
with its activations. The last two lines are ``train_peak_memory_ratio=<trace peak / baseline peak>``
(close to 1 meets it) and ``train_speed_ratio_vs_trl=<trace tokens/s / trl tokens/s>`` (at least 1).

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m-instruct|tiny-random|PATH] [--steps 6]
        [--warmup 2] [--batch-size 4] [--max-length 128] [--pairs 32] [--repeats 2] [--mixed]
        [--device auto|cpu|cuda] [--bf16]

On a GPU (``--device cuda``, benchmarks/gpu_check.sh) the step times wait for the queued kernels,
``--bf16`` gives every configuration bf16 autocast over fp32 weights (TRL's and the HF Trainer's
``bf16=True``), and the memory compared is the peak of GPU memory allocated by torch
(``torch.cuda.max_memory_allocated``, ``*_peak_gpu_mb``) instead of the peak resident memory.

The smallest run (a check of this script): ``--model tiny-random --steps 1 --warmup 1 --batch-size 2
--pairs 4 --repeats 1``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

from common import Stopwatch, choose_model, offline_environment, pair_samples, peak_rss_mb, print_metric, synthetic_pairs
from train_meter import Measured, TokenMeter, read_spec, rss_mb, run_child, step_timer_callback, summarize, write_result

offline_environment()  # before anything imports huggingface_hub / transformers / trl

LORA = dict(r=32, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
BETA = 0.3
SEED = 0
CONFIGS = ("trace", "trl", "baseline", "mixed")
LABELS = {
    "trace": "TRACE trainer (precomputed ref log-probs)",
    "trl": "TRL DPOTrainer (ref forward every step)",
    "baseline": "baseline: 1 LoRA model fwd+bwd+AdamW",
    "mixed": "TRACE trainer, mixed INVERT/PUNISH/RETAIN",
}

# --------------------------------------------------------------------------- TRACE training under the meter


def train_settings(spec):
    """TRACE's TrainingConfig for this benchmark: constant lr, fp32, one optimizer step per batch."""
    from trace_realign.core.config import LoraConfig, TrainingConfig

    return TrainingConfig(
        beta=BETA, lora=LoraConfig(**LORA), max_length=spec.max_length, learning_rate=spec.lr, lr_scheduler="constant",
        warmup_steps=0, max_steps=spec.warmup + spec.steps, per_device_batch_size=spec.batch_size,
        gradient_accumulation_steps=1, gradient_checkpointing=False, bf16=spec.bf16, logging_steps=spec.warmup + spec.steps,
        save_steps=0,
    )  # fmt: skip


def trace_train(model, tokenizer, samples, spec) -> tuple[Measured, list[float]]:
    """Train with TRACE's trainer under a step timer and a token meter; also return the logged losses."""
    from trace_realign.core.training import train

    meter = TokenMeter(model)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="trace-bench-") as out:
        result = train(model, tokenizer, samples, train_settings(spec), out, seed=SEED, progress=False, callbacks=[step_timer_callback(times)])
    return Measured(times, meter), [h["loss"] for h in result.log_history if "loss" in h]


def prefer_samples(tokenizer, pairs, max_length: int):
    """The pairs as PREFER samples (chosen over rejected), and the encoder's truncation counts."""
    from trace_realign.core.objective import SampleKind
    from trace_realign.core.tokenization import Encoder

    encoder = Encoder(tokenizer, max_length=max_length)
    return pair_samples(encoder, pairs, [SampleKind.PREFER], "p"), encoder.stats.as_dict()


# --------------------------------------------------------------------------- the configurations (what is measured)


def run_trace(spec, tokenizer, model, pairs) -> Measured:
    """TRACE's trainer on PREFER samples with uniform weights and precomputed reference log-probs."""
    from trace_realign.core.impact import reference_logps

    samples, enc_stats = prefer_samples(tokenizer, pairs, spec.max_length)
    # TRACE's reference stage (plain DPO data: uniform weights, reference log-probs only), timed
    # after one untimed warm-up batch (the first forward in a process pays one-time set-up costs).
    reference_logps(model, samples[: 2 * spec.batch_size], tokenizer.pad_token_id, batch_size=2 * spec.batch_size)
    with Stopwatch() as ref_pass:
        ref = reference_logps(model, samples, tokenizer.pad_token_id, batch_size=2 * spec.batch_size)
    samples = [replace(s, weight=1.0 / len(samples), ref_logps=(float(r[0]), float(r[1]))) for s, r in zip(samples, ref)]
    run, loss = trace_train(model, tokenizer, samples, spec)
    index = {(s.sequences[0].input_ids, s.sequences[1].input_ids): i for i, s in enumerate(samples)}
    # rows: [a0, b0, a1, b1, ...] in the collator's order
    batch_pairs = [[index[(rows[j], rows[j + 1])] for j in range(0, len(rows), 2)] for rows in run.meter.batches]
    run.extra = {
        "reference_pass_seconds": ref_pass.seconds,
        "reference_pass_tokens": sum(len(s.input_ids) for smp in samples for s in smp.sequences),
        "batch_pairs": batch_pairs,
        "encoder_stats": enc_stats,
        "loss": loss,
    }
    return run


def run_baseline(spec, tokenizer, model, pairs) -> Measured:
    """One model copy with its activations: forward + backward + AdamW on the trace run's batches."""
    import torch

    from trace_realign.core.logprobs import sequence_logps
    from trace_realign.core.objective import SampleKind, conflict_losses, flatten_sequences, gather_pairs
    from trace_realign.core.tokenization import pad_sequences

    samples, _ = prefer_samples(tokenizer, pairs, spec.max_length)
    device = model.device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    run = Measured([time.perf_counter()], TokenMeter(model))
    for idx in spec.batches:
        chosen = [samples[i] for i in idx]
        sequences, row_sample, row_slot = flatten_sequences(chosen)
        batch = pad_sequences(sequences, tokenizer.pad_token_id).to(device)
        kinds = torch.full((len(chosen),), int(SampleKind.PREFER), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            logps = sequence_logps(model, batch)  # as the trace run takes them: the LM head at response tokens
        policy = gather_pairs(logps.float(), row_sample.to(device), row_slot.to(device), len(chosen))
        loss = conflict_losses(kinds, policy, torch.zeros_like(policy), BETA).mean()  # no reference pass
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        run.times.append(time.perf_counter())
    return run


def run_trl(spec, tokenizer, model, pairs) -> Measured:
    """TRL's DPOTrainer with a peft LoraConfig, its defaults changed only where TRACE's settings differ."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from trace_realign.core.tokenization import render_prompt

    # The prompt pre-rendered with the chat template (the same text TRACE's Encoder renders), as
    # non-conversational TRL data: TRL appends the EOS text to each completion, so both trainers
    # see the same token sequences (checked by the parent through the per-step token counts).
    data = Dataset.from_list([{**p, "prompt": render_prompt(tokenizer, p["prompt"])} for p in pairs])
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=list(LORA["target_modules"]),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        config = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1,
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=spec.warmup + spec.steps,
            weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=spec.max_length,
            precompute_ref_log_probs=False,  # TRL's default: reference forward inside every step
            gradient_checkpointing=False,  # TRL defaults to True; TRACE runs without
            bf16=spec.bf16,  # TRL defaults to bf16 autocast; TRACE's default is fp32, --bf16 gives both bf16
            disable_dropout=False,  # keep LoRA dropout 0.1, as TRACE does
            use_cpu=spec.device == "cpu", report_to="none", logging_steps=spec.warmup + spec.steps, save_strategy="no", seed=SEED,
            data_seed=SEED, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
        )  # fmt: skip
        times: list[float] = []
        trainer = trl.DPOTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
            callbacks=[step_timer_callback(times)],
        )  # fmt: skip
        run = Measured(times, TokenMeter(trainer.model))
        trainer.train()
    run.extra = {
        "trl_version": trl.__version__,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    return run


def run_mixed(spec, tokenizer, model, pairs) -> Measured:
    """The TRACE objective on a mixed batch: a third INVERT, a third PUNISH, a third RETAIN."""
    from trace_realign.core.data import PreferencePair
    from trace_realign.core.config import TriageConfig, WeightsConfig
    from trace_realign.core.reference import run_reference_stage
    from trace_realign.core.triage import triage_pairs

    pairs = [PreferencePair.create(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    # (chosen complies, rejected complies) for INVERT, PUNISH, RETAIN in turn
    verdicts = [(False, True), (False, False), (True, False)]
    triaged = triage_pairs(pairs, [verdicts[i % 3][0] for i in range(len(pairs))], [verdicts[i % 3][1] for i in range(len(pairs))])
    weights = WeightsConfig(gold_size=min(24, len(pairs)), batch_size=2 * spec.batch_size)
    with Stopwatch() as stage:
        ref = run_reference_stage(model, tokenizer, triaged, train_settings(spec), weights, TriageConfig(), seed=SEED)
    run, loss = trace_train(model, tokenizer, ref.samples, spec)
    run.extra = {"reference_stage_seconds": stage.seconds, "reference_stats": ref.stats, "loss": loss}
    return run


RUNS = {"trace": run_trace, "trl": run_trl, "baseline": run_baseline, "mixed": run_mixed}


def child(spec_path: Path) -> None:
    """Run one configuration as the spec file says and hand its summary back to the parent."""
    spec = read_spec(spec_path)
    warnings.filterwarnings("ignore")
    # Every child imports the same libraries before its first RSS reading (TRL's child TRL too).
    import torch
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import trace_realign.core.impact  # noqa: F401
    import trace_realign.core.reference  # noqa: F401
    import trace_realign.core.training  # noqa: F401
    from trace_realign.core.config import LoraConfig
    from trace_realign.core.modeling import add_lora, load_model, load_tokenizer

    if spec.config == "trl":
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    torch.manual_seed(SEED)
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    load_start = os.getloadavg()[0]
    rss_imports = rss_mb()
    tokenizer = load_tokenizer(spec.model_path)
    model = load_model(spec.model_path, device=spec.device)
    if spec.config != "trl":  # TRL adds its own adapter from the LoraConfig
        model = add_lora(model, LoraConfig(**LORA), seed=SEED)
    rss_model = rss_mb()
    pairs = synthetic_pairs(tokenizer, spec.pairs, spec.max_length, seed=SEED)
    result = summarize(spec.config, RUNS[spec.config](spec, tokenizer, model, pairs), spec.warmup, spec.steps)
    result.update(
        rss_after_imports_mb=rss_imports,
        rss_after_model_mb=rss_model,
        peak_rss_mb=peak_rss_mb(),
        **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if spec.device.startswith("cuda") else {}),
        torch_threads=torch.get_num_threads(),
        loadavg=(round(load_start, 2), round(os.getloadavg()[0], 2)),
    )
    write_result(spec_path, result)


# --------------------------------------------------------------------------- parent: schedule and report


def run_config(config: str, args, batches: list | None = None) -> dict:
    """Run one configuration in its own process with the CLI's settings (and the baseline's batches)."""
    spec = {**vars(args), "model_path": str(args.model_path), "batches": batches}
    return run_child(Path(__file__).resolve(), config, spec)


def best_rounds(args) -> dict[str, dict]:
    """Alternate TRACE and TRL for ``--repeats`` rounds (baseline once, mixed each round if asked).

    On a shared 2-core machine other processes can steal CPU time from any one run, so each
    configuration keeps its best round by tokens/s, with the per-round rates, its largest peak
    RSS and each round's load averages added.
    """
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    for round_ in range(args.repeats):
        runs["trace"].append(run_config("trace", args))
        if round_ == 0:
            runs["baseline"].append(run_config("baseline", args, runs["trace"][0]["batch_pairs"]))
        runs["trl"].append(run_config("trl", args))
        if args.mixed:
            runs["mixed"].append(run_config("mixed", args))
    res = {}
    for config, items in runs.items():
        if items:
            best = dict(max(items, key=lambda r: r["tokens_per_s"]))
            best["all_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in items]
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in items)
            if "peak_gpu_mb" in best:
                best["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in items)
            best["loads"] = [r["loadavg"] for r in items]
            res[config] = best
    return res


def report(res: dict[str, dict]) -> None:
    """Print the comparison table, the per-round detail, the checks and the ``key=value`` lines."""
    tr, tl, bl = res["trace"], res["trl"], res["baseline"]
    print()
    print(f"{'configuration':<44} {'tok/s':>8} {'timed tok':>10} {'timed s':>8} {'peak RSS MB':>12} {'RSS model MB':>13}")
    for config, r in res.items():
        print(
            f"{LABELS[config]:<44} {r['tokens_per_s']:8.1f} {r['timed_tokens']:10d} {r['timed_seconds']:8.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['rss_after_model_mb']:13.0f}"
        )
    print()
    for config, r in res.items():
        print(
            f"{config:<8} tok/s per round {r['all_tokens_per_s']}  best round: step seconds {r['step_seconds']}  "
            f"tokens/step {r['tokens_per_step']}  shapes {r['batch_shapes']}  1-min load avg at start/end {r['loads']}"
        )
    print(f"trace loss {tr['loss']}  trl loss {tl['loss']}")
    same_tokens = tr["tokens_per_step"] == tl["tokens_per_step"]
    print(
        f"token check: TRACE and TRL processed {'the same' if same_tokens else 'DIFFERENT'} non-padding tokens per step "
        f"(trace {sum(tr['tokens_per_step'])}, trl {sum(tl['tokens_per_step'])} over all steps); "
        f"TRACE encoder truncations {tr['encoder_stats']}"
    )
    print(
        "note: TRL (precompute_ref_log_probs=False, its default) runs a no-grad reference forward with the adapter "
        "disabled inside every training step; TRACE takes the reference log-probs precomputed once by its reference "
        "stage (which it needs anyway for the impact weights), so its training step has no reference forward. "
        "That is a design advantage of TRACE, not a change to the workload: the DPO loss and the tokens are the same."
    )
    ref_rate = tr["reference_pass_tokens"] / tr["reference_pass_seconds"]
    amortized = 1.0 / (1.0 / tr["tokens_per_s"] + 1.0 / ref_rate)
    print(
        f"TRACE's one-time reference pass: {tr['reference_pass_tokens']} tokens in {tr['reference_pass_seconds']:.2f} s "
        f"({ref_rate:.0f} tok/s, no grad); charged to a 1-epoch run it gives {amortized:.1f} tok/s "
        f"(ratio vs TRL {amortized / tl['tokens_per_s']:.3f})"
    )
    print(
        f"TRACE vs baseline speed: {tr['tokens_per_s'] / bl['tokens_per_s']:.3f} "
        f"(Trainer overhead over the plain loop); TRL peak / baseline peak: {tl['peak_rss_mb'] / bl['peak_rss_mb']:.3f}; "
        f"RSS after imports: trace {tr['rss_after_imports_mb']:.0f} MB, baseline {bl['rss_after_imports_mb']:.0f} MB, "
        f"trl {tl['rss_after_imports_mb']:.0f} MB"
    )
    if "mixed" in res:
        m = res["mixed"]
        print(
            f"mixed TRACE: reference stage (gold gradient + exact impact scores + ref log-probs) "
            f"{m['reference_stage_seconds']:.1f} s; stats {m['reference_stats']}; "
            f"mixed/TRL speed {m['tokens_per_s'] / tl['tokens_per_s']:.3f}"
        )
    print_metric("trace_tokens_per_s", tr["tokens_per_s"], ".2f")
    print_metric("trl_tokens_per_s", tl["tokens_per_s"], ".2f")
    print_metric("trace_peak_rss_mb", tr["peak_rss_mb"], ".0f")
    print_metric("baseline_peak_rss_mb", bl["peak_rss_mb"], ".0f")
    print_metric("trl_peak_rss_mb", tl["peak_rss_mb"], ".0f")
    if "peak_gpu_mb" in tr:
        for config, r in res.items():
            print_metric(f"{config}_peak_gpu_mb", r["peak_gpu_mb"], ".0f")
    peak = "peak_gpu_mb" if "peak_gpu_mb" in tr else "peak_rss_mb"
    print_metric("train_peak_memory_ratio", tr[peak] / bl[peak], ".4f")
    print_metric("train_speed_ratio_vs_trl", tr["tokens_per_s"] / tl["tokens_per_s"], ".4f")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="known model name or folder (default: smollm2-135m-instruct, else tiny-random)")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x sequences)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pairs", type=int, default=32, help="synthetic pairs (the reference pass covers them all)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--repeats", type=int, default=2, help="alternating TRACE/TRL rounds; the best round counts")
    p.add_argument("--mixed", action="store_true", help="also time a mixed INVERT/PUNISH/RETAIN TRACE batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when a GPU is visible)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every configuration (a GPU's setting)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return
    if (args.warmup + args.steps) * args.batch_size > args.pairs:
        p.error("--pairs must cover (warmup + steps) * batch-size pairs (one epoch, no pair seen twice)")

    model_name, args.model_path = choose_model(args.model)
    from trace_realign.core.modeling import resolve_device

    args.device = resolve_device(args.device)

    import peft
    import torch
    import transformers
    import trl

    print(f"model: {model_name} ({args.model_path})")
    print(
        f"settings: {args.batch_size} pairs/step ({2 * args.batch_size} sequences), max_length {args.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, lr {args.lr} constant, beta {BETA}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'} on {args.device}, "
        f"no gradient checkpointing, LoRA r {LORA['r']} alpha {LORA['alpha']} dropout {LORA['dropout']} "
        f"on {'+'.join(LORA['target_modules'])}, {args.pairs} synthetic pairs"
    )
    print(
        f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}; {os.cpu_count()} CPUs"
        + (f"; GPU {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else "")
    )
    print("running each configuration in its own process:", flush=True)
    report(best_rounds(args))


if __name__ == "__main__":
    main()
