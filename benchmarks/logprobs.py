"""Benchmark: log-probs at response tokens only (chunked) against full-vocabulary logits, on the demo's shapes.

Two stages, each run once per path in its own child process (so each peak resident memory is that
run's own), alternating the paths for ``--repeats`` rounds and keeping each path's best time:

- ``reference``: what the reference stage computes (arXiv 2511.02623, stage 3): the gold-batch
  gradient g_F (``--gold`` pairs) and the exact impact scores with the reference log-probs of
  ``--pairs`` conflict pairs, batches of ``--batch-size`` pairs (default: configs/demo.yaml's
  ``weights.batch_size``).
- ``train``: TRACE training steps on a mixed batch (INVERT, PUNISH and RETAIN thirds: the RETAIN
  KL takes full distributions on RETAIN response tokens), ``--train-batch`` samples a forward and
  ``--accumulation`` forwards a step (default: the demo's); ``--warmup`` optimizer steps are not timed.

The ``full`` path is the previous implementation (``[N, T, V]`` logits of every position and a
log-softmax over them; ``trace_realign.core.logprobs.full_vocabulary_logits``), the ``chunked`` path
the default. Memory is the peak resident set during the stage (``VmHWM``, reset just before it)
minus the resident set before it: what the stage adds over the loaded model; the absolute peaks are
printed too. The outputs of both paths are compared: impact scores and reference log-probs, and
the trained adapter. What bounds the memory ratio is printed too: the MiB autograd holds for the
backward of one training forward, by the module that saved each tensor (``saved_tensors_hooks``),
and what bounds the speed ratios: a ``torch.profiler`` profile of one reference batch and of one
training forward and backward on each path, its self CPU time split into the operators with a
vocabulary-sized input (the LM head's matmuls, log-softmax, the KL) and the rest (the model body);
``<stage>_speedup_ceiling`` is the speedup the full path would get if that vocabulary-sized work took
no time at all, an upper bound for computing the head at fewer positions.

Targets (issue 14): reference stage at least 1.3x faster, training step at least 1.2x faster, each
stage's peak memory at most 0.6x, outputs equal to 1e-5 relative. The last lines are
``reference_speedup``, ``train_speedup``, ``reference_memory_ratio``, ``train_memory_ratio``,
``reference_scores_max_rel_diff``, ``train_gradient_rel_diff`` (the loss and gradient of one
training forward at the initial weights, normwise) and ``train_adapter_max_rel_diff``. The adapters
after the timed steps can differ by more than the gradients: Adam's first updates are about
``lr * sign(g)``, so an element whose gradient is near Adam's epsilon (1e-8) turns a rounding
difference into a visible one (SmolLM2, 2 steps: up to 9e-6 on LoRA B weights of 1e-3).

    .venv/bin/python benchmarks/logprobs.py [--model smollm2-135m-instruct|tiny-random|PATH] [--pairs 32]
        [--gold 16] [--batch-size 2] [--train-batch 2] [--accumulation 4] [--max-length 192] [--steps 4] [--warmup 1] [--repeats 3]

The smallest run (a check of this script): ``--model tiny-random --pairs 4 --gold 2 --steps 1 --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import ROOT, choose_model, offline_environment, pair_samples, print_metric, run_checked, synthetic_pairs
from train_meter import rss_mb

offline_environment()  # before anything imports huggingface_hub / transformers

BETA = 0.3
PATHS = ("full", "chunked")
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
"""The demo's config: its batch shapes are the benchmark's defaults."""


def reset_peak() -> None:
    """Reset this process's peak resident set (Linux: ``VmHWM``) to its current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    """This process's peak resident set (``VmHWM``) in MiB since the last :func:`reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------- the breakdown


def saved_for_backward(model, samples, settings, pad) -> dict[str, float]:
    """MiB that autograd keeps for the backward of one training micro-batch (``samples``, one
    forward of the TRACE loss), by the innermost running module class that saved each tensor ("loss": what
    the loss computes outside the model's modules, the log-softmax over logits included).
    Each storage counts once; parameters do not count. What the activations of the shared model
    body cost, against what the logits cost, is what bounds the memory ratio of the two paths."""
    import torch

    from trace_realign.core.training import SampleCollator, SampleDataset, TraceTrainer, training_arguments

    stack: list[str] = []
    hooks = []
    head = model.get_output_embeddings()

    def enter(module, *args):
        cls = type(module)
        stack.append("LM head" if module is head else f"{cls.__module__.split('.')[0]}.{cls.__name__}")

    def leave(module, *args):
        stack.pop()

    for module in model.modules():  # the innermost running module saved the tensor
        hooks.append(module.register_forward_pre_hook(enter))
        hooks.append(module.register_forward_hook(leave))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_owner: dict[str, float] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            owner = stack[-1] if stack else "loss (log-softmax, KL)"
            by_owner[owner] = by_owner.get(owner, 0.0) + t.untyped_storage().nbytes() / 2**20
        return t

    dataset = SampleDataset(samples)
    inputs = SampleCollator(dataset, pad)([{"index": i} for i in range(len(samples))])
    with tempfile.TemporaryDirectory(prefix="logprobs-saved-") as tmp:
        trainer = TraceTrainer(
            model=model, args=training_arguments(settings, tmp, progress=False), train_dataset=dataset,
            beta=BETA, alpha_kl=settings.alpha_kl, punish_form="trace",
        )  # fmt: skip
        model.train()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = trainer.compute_loss(model, inputs)
        finally:
            for h in hooks:
                h.remove()
        model.zero_grad(set_to_none=True)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["loss"] = loss.detach().reshape(1)
    model.zero_grad(set_to_none=True)
    return dict(sorted(by_owner.items(), key=lambda kv: -kv[1])), grads


def vocabulary_profile(fn, vocab: int) -> tuple[dict, object]:
    """Run ``fn()`` once under ``torch.profiler``; return (the profile, what ``fn`` returned). The
    profile splits the self CPU time of its operators into those with a vocabulary-sized input (a dimension equal to ``vocab``: the LM head's matmuls,
    the log-softmax, the softmax's backward) and the rest (the model body). Embedding lookups are
    left out of the vocabulary share (their table is [V, H] but they read N rows). Seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        returned = fn()
    total = in_vocab = 0.0
    by_op: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        total += seconds
        if "embedding" not in event.key and any(vocab in shape for shape in event.input_shapes if isinstance(shape, (list, tuple))):
            in_vocab += seconds
            by_op[event.key] = by_op.get(event.key, 0.0) + seconds
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:4]
    return {"total": total, "vocab": in_vocab, "top": top}, returned


# --------------------------------------------------------------------------- the child


def child(spec_path: Path) -> None:
    import contextlib

    import torch

    from trace_realign.core.config import LoraConfig, TrainingConfig
    from trace_realign.core.impact import gold_gradient, impact_scores, reference_logps
    from trace_realign.core.logprobs import full_vocabulary_logits
    from trace_realign.core.modeling import add_lora, load_model, load_tokenizer
    from trace_realign.core.objective import Sample, SampleKind
    from trace_realign.core.tokenization import Encoder
    from trace_realign.core.training import train

    import trace_realign.core.logprobs as logprobs

    full_calls = [0]  # forwards that took the full-vocabulary path: the switch must be what decides
    full_tokens = logprobs._full_tokens

    def counted(model, batch):
        full_calls[0] += 1
        return full_tokens(model, batch)

    logprobs._full_tokens = counted
    spec = json.loads(spec_path.read_text())
    out = spec_path.parent
    torch.manual_seed(0)
    tokenizer = load_tokenizer(spec["model"])
    model = add_lora(load_model(spec["model"]), LoraConfig(dropout=0.0), seed=0)
    encoder = Encoder(tokenizer, max_length=spec["max_length"])
    pad = tokenizer.pad_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    switch = full_vocabulary_logits if spec["path"] == "full" else contextlib.nullcontext  # a new one for each block
    result: dict = {}
    if spec["stage"] == "reference":
        samples = pair_samples(encoder, synthetic_pairs(tokenizer, spec["pairs"], spec["max_length"], seed=1), [SampleKind.PREFER, SampleKind.PUNISH], "b")
        gold = pair_samples(encoder, synthetic_pairs(tokenizer, spec["gold"], spec["max_length"], seed=2), [SampleKind.PREFER], "g")
        before = rss_mb()
        reset_peak()
        start = time.perf_counter()
        with switch():
            g_f = gold_gradient(model, gold, BETA, pad, spec["batch_size"])
            scored = impact_scores(model, samples, g_f, BETA, pad, batch_size=spec["batch_size"])
        result["seconds"] = time.perf_counter() - start
        torch.save({"scores": scored.scores, "ref_logps": scored.ref_logps}, out / "outputs.pt")
        result["peak_mb"] = peak_mb()
        with switch():  # after the measured stage: one batch's impact scores (a forward and a backward)
            one = samples[: spec["batch_size"]]
            result["profile"], _ = vocabulary_profile(lambda: impact_scores(model, one, g_f, BETA, pad, batch_size=spec["batch_size"]), vocab)
    else:
        pairs = synthetic_pairs(tokenizer, spec["pairs"], spec["max_length"], seed=3)
        two = pair_samples(encoder, pairs, [SampleKind.PREFER, SampleKind.PUNISH, SampleKind.PREFER], "t")
        samples = [  # thirds: INVERT (PREFER), PUNISH, RETAIN (the chosen response alone)
            s if i % 3 != 2 else Sample(s.pair_id, SampleKind.RETAIN, s.sequences[:1]) for i, s in enumerate(two)
        ]
        ref = reference_logps(model, samples, pad)  # the same inputs for both paths: computed before, the same way
        n_conflict = sum(s.kind != SampleKind.RETAIN for s in samples)
        samples = [
            Sample(s.pair_id, s.kind, s.sequences, 0.0 if s.kind == SampleKind.RETAIN else 1.0 / n_conflict, tuple(ref[i].tolist()))
            for i, s in enumerate(samples)
        ]
        steps = spec["warmup"] + spec["steps"]
        settings = TrainingConfig(
            beta=BETA, alpha_kl=1.0, max_length=spec["max_length"], learning_rate=5e-4, lr_scheduler="constant", warmup_steps=0,
            max_steps=steps, per_device_batch_size=spec["train_batch"], gradient_accumulation_steps=spec["accumulation"],
            logging_steps=steps, save_steps=0,
        )  # fmt: skip
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        times: list[float] = []
        from train_meter import step_timer_callback

        before = rss_mb()
        reset_peak()
        with switch(), tempfile.TemporaryDirectory(prefix="logprobs-train-") as tmp:
            train(model, tokenizer, samples, settings, tmp, seed=0, progress=False, callbacks=[step_timer_callback(times)])
        result["seconds"] = times[-1] - times[spec["warmup"]]  # times[0]: train begin; times[k]: end of step k
        result["timed_steps"] = spec["steps"]
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, out / "outputs.pt")
        result["peak_mb"] = peak_mb()
        with torch.no_grad():  # both paths' gradients at the same weights: the initial ones
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        with switch():  # after the measured steps: its memory must not be in their peak, nor lie free for them
            # one training forward and backward, profiled, with what autograd saved for it by module
            result["profile"], (result["saved"], grads) = vocabulary_profile(
                lambda: saved_for_backward(model, samples[: spec["train_batch"]], settings, pad), vocab
            )
        torch.save(grads, out / "gradients.pt")
    result.setdefault("peak_mb", peak_mb())
    result["full_calls"] = full_calls[0]
    result["before_mb"] = before
    result["stage_mb"] = result["peak_mb"] - before
    (out / "result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- the parent


def run(stage: str, path: str, base: dict, keep: Path) -> dict:
    folder = keep / f"{stage}-{path}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({**base, "stage": stage, "path": path}))
    run_checked([sys.executable, __file__, "--child", str(spec)], f"{stage} ({path})")
    result = json.loads((folder / "result.json").read_text())
    if (result["full_calls"] > 0) != (path == "full"):
        raise SystemExit(f"{stage} ({path}): {result['full_calls']} forwards took the full-vocabulary path")
    print(f"  {stage:<9} {path:<8} {result['seconds']:7.2f} s, adds {result['stage_mb']:7.0f} MiB (peak RSS {result['peak_mb']:6.0f} MiB)", flush=True)
    return result


def max_rel_diff(a: dict, b: dict) -> float:
    import torch

    worst = 0.0
    for key in a:
        x, y = a[key].double(), b[key].double()
        scale = y.abs().max().clamp(min=1e-12)
        worst = max(worst, ((x - y).abs().max() / scale).item())
    return worst


def normwise_rel_diff(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all tensors of ``a`` and ``b`` flattened into one vector each."""
    import torch

    x = torch.cat([a[k].double().flatten() for k in sorted(a)])
    y = torch.cat([b[k].double().flatten() for k in sorted(a)])
    return ((x - y).norm() / y.norm().clamp(min=1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="smollm2-135m-instruct, tiny-random or a folder")
    ap.add_argument("--pairs", type=int, default=32, help="conflict pairs scored; pairs split into training samples")
    ap.add_argument("--gold", type=int, default=16, help="gold-batch pairs behind g_F")
    ap.add_argument("--batch-size", type=int, default=DEMO["weights"]["batch_size"], help="pairs per reference batch (the demo's)")
    ap.add_argument("--train-batch", type=int, default=DEMO["training"]["per_device_batch_size"], help="training samples per forward (the demo's)")
    ap.add_argument("--accumulation", type=int, default=DEMO["training"]["gradient_accumulation_steps"], help="forwards per optimizer step (the demo's)")
    ap.add_argument("--max-length", type=int, default=DEMO["training"]["max_length"])
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, paths alternating; each path's best time is kept (2 cores are noisy)")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    name, model = choose_model(args.model)
    base = {"model": str(model), "pairs": args.pairs, "gold": args.gold, "batch_size": args.batch_size,
            "train_batch": args.train_batch, "accumulation": args.accumulation,
            "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    print(f"model={name} threads={torch.get_num_threads()} pairs={args.pairs} gold={args.gold} max_length={args.max_length} "
          f"reference batch={args.batch_size} pairs, training {args.train_batch} samples x {args.accumulation} accumulation")  # fmt: skip
    best: dict = {}
    with tempfile.TemporaryDirectory(prefix="logprobs-bench-") as tmp:
        for r in range(args.repeats):
            print(f"round {r + 1}/{args.repeats}")
            for stage in ("reference", "train"):
                for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                    result = run(stage, path, base, Path(tmp) / f"r{r}")
                    if (stage, path) not in best or result["seconds"] < best[stage, path]["seconds"]:
                        best[stage, path] = result
                    best[stage, path].setdefault("outputs", Path(tmp) / f"r{r}" / f"{stage}-{path}" / "outputs.pt")
        diffs = {stage: max_rel_diff(torch.load(best[stage, "chunked"]["outputs"]), torch.load(best[stage, "full"]["outputs"])) for stage in ("reference", "train")}
        gradients = [torch.load(best["train", path]["outputs"].with_name("gradients.pt")) for path in ("chunked", "full")]
        diffs["gradient"] = normwise_rel_diff(*gradients)
    for stage in ("reference", "train"):
        f, c = best[stage, "full"], best[stage, "chunked"]
        print(f"{stage}: full {f['seconds']:.2f} s / {f['stage_mb']:.0f} MiB, chunked {c['seconds']:.2f} s / {c['stage_mb']:.0f} MiB "
              f"(absolute peaks {f['peak_mb']:.0f} vs {c['peak_mb']:.0f} MiB)")  # fmt: skip
    f, c = best["train", "full"]["saved"], best["train", "chunked"]["saved"]
    print(f"held for the backward of one training forward ({args.train_batch} samples), MiB, by the module that saved it:")
    print(f"  {'module':<36} {'full':>8} {'chunked':>8}")
    for owner in sorted(set(f) | set(c), key=lambda k: -max(f.get(k, 0.0), c.get(k, 0.0))):
        print(f"  {owner:<36} {f.get(owner, 0.0):>8.1f} {c.get(owner, 0.0):>8.1f}")
    print(f"  {'total':<36} {sum(f.values()):>8.1f} {sum(c.values()):>8.1f}")
    print("profile (torch.profiler, self CPU seconds of one reference batch / one training forward and backward),")
    print(f"  the operators with a vocabulary-sized input (the LM head, log-softmax, KL) against the rest:")
    print(f"  {'stage':<9} {'path':<8} {'total':>7} {'vocabulary':>10} {'share':>6}  {'ceiling':>7}  largest vocabulary-sized operators")
    for stage in ("reference", "train"):
        for path in PATHS:
            prof = best[stage, path]["profile"]
            ceiling = prof["total"] / max(prof["total"] - prof["vocab"], 1e-9)  # the speedup if those took no time
            top = ", ".join(f"{op} {sec:.2f}" for op, sec in prof["top"])
            print(f"  {stage:<9} {path:<8} {prof['total']:7.2f} {prof['vocab']:10.2f} {100 * prof['vocab'] / prof['total']:5.1f}%  {ceiling:6.2f}x  {top}")
    print_metric("reference_speedup", best["reference", "full"]["seconds"] / best["reference", "chunked"]["seconds"])
    print_metric("train_speedup", best["train", "full"]["seconds"] / best["train", "chunked"]["seconds"])
    for stage in ("reference", "train"):  # what the full path would gain if its vocabulary-sized work took no time at all
        prof = best[stage, "full"]["profile"]
        print_metric(f"{stage}_speedup_ceiling", prof["total"] / max(prof["total"] - prof["vocab"], 1e-9))
    print_metric("reference_memory_ratio", best["reference", "chunked"]["stage_mb"] / best["reference", "full"]["stage_mb"])
    print_metric("train_memory_ratio", best["train", "chunked"]["stage_mb"] / best["train", "full"]["stage_mb"])
    print_metric("reference_scores_max_rel_diff", diffs["reference"], ".2e")
    print_metric("train_gradient_rel_diff", diffs["gradient"], ".2e")
    print_metric("train_adapter_max_rel_diff", diffs["train"], ".2e")


if __name__ == "__main__":
    main()
