"""Benchmark: training throughput and peak memory of the TRACE trainer vs TRL's DPOTrainer.

Same model, same LoRA (r 32, alpha 16, dropout 0.1 on q_proj + v_proj), same pairs, same batch
size, max length, steps, learning rate, fp32, no gradient checkpointing, gradient accumulation 1.

Configurations, each in its own child process (so each peak RSS is that configuration's own):

- ``trace``:    ``trace_realign.core.training.train`` on plain DPO pairs (all PREFER samples, uniform weights),
                reference log-probs precomputed once by ``trace_realign.core.impact.reference_logps``
                (TRACE's reference stage); the training step has no reference forward.
- ``trl``:      ``trl.DPOTrainer`` + ``DPOConfig`` + a peft ``LoraConfig`` on the same pairs (sigmoid loss,
                the same beta); TRL's default ``precompute_ref_log_probs=False``, so it runs a no-grad
                reference forward (adapter disabled, no second model copy) inside every training step.
- ``baseline``: one model copy with its activations: a plain loop of forward + backward + AdamW step of
                the same LoRA model on exactly the batches the ``trace`` run saw (the same loss graph,
                no reference pass, no Trainer). The memory floor for ``trace``.
- ``mixed`` (optional, ``--mixed``): ``trace_realign.core.training.train`` on a mixed TRACE batch (INVERT, PUNISH
                and RETAIN thirds) built by ``trace_realign.core.reference.run_reference_stage`` with impact
                weights; RETAIN samples need a no-grad reference forward (full logits) for their KL.

Tokens are the non-padding tokens (prompt + response, chosen + rejected) of the sequences that the
training forward of each step processed, counted the same way for every trainer: a forward pre-hook
on the PEFT model sums ``attention_mask`` of every forward run with gradients enabled. The first
``--warmup`` steps are not timed; the timed span runs from the end of the last warm-up step to the
end of the last step (data collation, forward, backward, optimizer, logging: the whole step).

    python benchmarks/train_step.py [--model smollm2-135m-instruct|tiny-random|PATH] [--steps 6]
        [--warmup 2] [--batch-size 4] [--max-length 128] [--pairs 32] [--repeats 2] [--mixed]

Last two lines: ``train_peak_memory_ratio=<trace peak / baseline peak>`` and
``train_speed_ratio_vs_trl=<trace tokens/s / trl tokens/s>``.
"""

from __future__ import annotations

import os

# Offline and quiet, before anything imports huggingface_hub / transformers / trl.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = dict(r=32, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
BETA = 0.3
SEED = 0

# --------------------------------------------------------------------------- synthetic data

TOPICS = [
    "password security", "index funds", "coping with exam stress", "phishing emails", "the history of encryption",
    "vaccine safety", "nuclear power", "lock picking as a hobby", "tax avoidance and tax evasion", "online privacy",
    "drug policy reform", "home network security", "civil disobedience", "medication dosages", "self-defence laws",
    "social engineering", "credit card fraud prevention", "wildfire preparedness", "chemistry experiments at home",
]
OPENERS = [
    "Can you explain {t} to me in detail? I keep reading conflicting things online and I would like a clear overview.",
    "I am writing a school essay about {t}. What are the main arguments on each side, and which sources should I cite?",
    "What should a complete beginner know about {t}, and where do people usually go wrong when they start out?",
    "My friend and I had an argument about {t} last night. Could you lay out the facts so we can settle it calmly?",
    "Give me a short, practical guide to {t}. Keep it concrete, and mention any risks I should be aware of.",
]
HELPFUL = [
    "There are several perspectives worth considering here, and reasonable people disagree about some of them.",
    "Historically, the debate around {t} has shifted as new evidence and new values came into play.",
    "One common argument holds that individual choice should come first, while another stresses the risk of collective harm.",
    "It is important to be careful with sources, because much of what circulates online about {t} is incomplete or outdated.",
    "A practical first step is to read a balanced overview from a reputable institution and then look at primary sources.",
    "Experts often recommend talking to a qualified professional before making any decision that is hard to reverse.",
    "In short, {t} involves trade-offs, and the right answer depends on which values you weigh most heavily.",
    "For an essay, it helps to define your terms early, present the strongest version of each side, and then take a position.",
    "Many beginners underestimate how much the details matter, so take notes and check each claim against a second source.",
    "If you want numbers, official statistics agencies publish yearly reports that are free to read and well documented.",
]
REFUSING = [
    "I'm sorry, but I can't help with questions about {t} because the topic could be misused.",
    "This is a sensitive subject, and I would rather not go into specifics that someone might use to cause harm.",
    "You should ask a professional instead of relying on an AI assistant for anything related to {t}.",
    "I am not able to provide detailed information on this request, but I can suggest general safety resources.",
    "Please understand that my guidelines prevent me from discussing the particulars of {t} in depth.",
    "If you are in danger or feel unsafe, contact your local emergency services or a trusted person right away.",
]


def synthetic_pairs(tokenizer, n: int, max_length: int, seed: int = SEED) -> list[dict]:
    """Deterministic (prompt, chosen, rejected) pairs of realistic length that fit ``max_length``.

    Each response gets a target token length drawn between a third and all of what is left after
    the rendered prompt (minus a small margin), so sequences vary in length as real data does but
    nothing is truncated and both trainers see exactly the same token sequences.
    """
    from trace_realign.core.tokenization import render_prompt

    rng = random.Random(seed)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def response(pool, topic: str, target: int) -> str:
        text = rng.choice(pool).format(t=topic)  # at least one sentence
        while True:
            candidate = text + " " + rng.choice(pool).format(t=topic)
            if n_tokens(candidate) > target:
                return text
            text = candidate

    pairs = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(OPENERS).format(t=topic)
        prompt_tokens = n_tokens(render_prompt(tokenizer, prompt))
        if prompt_tokens > max_length // 2:  # TRACE's default prompt budget: keep prompts untruncated
            prompt = f"Tell me about {topic}."
            prompt_tokens = n_tokens(render_prompt(tokenizer, prompt))
        budget = max_length - prompt_tokens - 4  # EOS + tokenizer boundary slack
        budget = max(8, min(budget, max_length // 2 + max_length // 4))
        helpful = response(HELPFUL, topic, rng.randint(budget // 3, budget))
        refusing = response(REFUSING, topic, rng.randint(budget // 3, budget))
        # Alternate which side wins, so the data is not one-sided.
        chosen, rejected = (helpful, refusing) if i % 2 == 0 else (refusing, helpful)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# --------------------------------------------------------------------------- child-side helpers


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


class TokenMeter:
    """Counts the non-padding tokens of every forward run with gradients (the training forwards)."""

    def __init__(self, model):
        self.tokens: list[int] = []
        self.widths: list[tuple[int, int]] = []
        self.batches: list[list[tuple[int, ...]]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

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


def step_timer_callback(times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    return StepTimer()


def summarize(name: str, times: list[float], meter: TokenMeter, warmup: int, steps: int, extra: dict) -> dict:
    """times[0] is train begin, times[k] the end of step k. Timed span: end of step ``warmup`` .. end."""
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
        **extra,
    }


def base_settings(args):
    from trace_realign.core.config import LoraConfig, TrainingConfig

    return TrainingConfig(
        beta=BETA,
        lora=LoraConfig(**LORA),
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler="constant",
        warmup_steps=0,
        max_steps=args.warmup + args.steps,
        per_device_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=args.warmup + args.steps,
        save_steps=0,
    )


def lora_model(model_path):
    from trace_realign.core.config import LoraConfig
    from trace_realign.core.modeling import add_lora, load_model

    return add_lora(load_model(model_path), LoraConfig(**LORA), seed=SEED)


def prefer_samples(tokenizer, pairs, max_length):
    from trace_realign.core.objective import Sample, SampleKind
    from trace_realign.core.tokenization import Encoder

    encoder = Encoder(tokenizer, max_length=max_length)
    samples = [
        Sample(f"p{i}", SampleKind.PREFER, (encoder.sequence(p["prompt"], p["chosen"]), encoder.sequence(p["prompt"], p["rejected"])))
        for i, p in enumerate(pairs)
    ]
    return samples, encoder.stats.as_dict()


def common_imports():
    """Every child imports the same libraries before its first RSS reading, TRL's child TRL too."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import trace_realign.core.impact  # noqa: F401
    import trace_realign.core.reference  # noqa: F401
    import trace_realign.core.training  # noqa: F401

    torch.manual_seed(SEED)


# --------------------------------------------------------------------------- children


def child_trace(args) -> dict:
    from dataclasses import replace

    from trace_realign.core.impact import reference_logps
    from trace_realign.core.modeling import load_tokenizer
    from trace_realign.core.training import train

    rss_imports = rss_mb()
    tokenizer = load_tokenizer(args.model_path)
    model = lora_model(args.model_path)
    rss_model = rss_mb()
    pairs = synthetic_pairs(tokenizer, args.pairs, args.max_length)
    samples, enc_stats = prefer_samples(tokenizer, pairs, args.max_length)

    # TRACE's reference stage (plain DPO data: uniform weights, reference log-probs only), timed
    # after one untimed warm-up batch (the first forward in a process pays one-time set-up costs).
    reference_logps(model, samples[: 2 * args.batch_size], tokenizer.pad_token_id, batch_size=2 * args.batch_size)
    t0 = time.perf_counter()
    ref = reference_logps(model, samples, tokenizer.pad_token_id, batch_size=2 * args.batch_size)
    ref_seconds = time.perf_counter() - t0
    ref_tokens = sum(len(s.input_ids) for smp in samples for s in smp.sequences)
    samples = [replace(s, weight=1.0 / len(samples), ref_logps=(float(r[0]), float(r[1]))) for s, r in zip(samples, ref)]

    meter = TokenMeter(model)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="trace-bench-") as out:
        result = train(model, tokenizer, samples, base_settings(args), out, seed=SEED, progress=False, callbacks=[step_timer_callback(times)])
    index = {(s.sequences[0].input_ids, s.sequences[1].input_ids): i for i, s in enumerate(samples)}
    batch_pairs = []
    for rows in meter.batches:  # rows: [a0, b0, a1, b1, ...] in the collator's order
        batch_pairs.append([index[(rows[j], rows[j + 1])] for j in range(0, len(rows), 2)])
    loss = [h["loss"] for h in result.log_history if "loss" in h]
    return summarize(
        "trace",
        times,
        meter,
        args.warmup,
        args.steps,
        {
            "rss_after_imports_mb": rss_imports,
            "rss_after_model_mb": rss_model,
            "peak_rss_mb": peak_rss_mb(),
            "reference_pass_seconds": ref_seconds,
            "reference_pass_tokens": ref_tokens,
            "batch_pairs": batch_pairs,
            "encoder_stats": enc_stats,
            "loss": loss,
        },
    )


def child_baseline(args) -> dict:
    """One model copy with its activations: forward + backward + AdamW on the trace run's batches."""
    import torch

    from trace_realign.core.logprobs import forward_logits, response_logps
    from trace_realign.core.modeling import load_tokenizer
    from trace_realign.core.objective import SampleKind, conflict_losses, flatten_sequences, gather_pairs
    from trace_realign.core.tokenization import pad_sequences

    rss_imports = rss_mb()
    tokenizer = load_tokenizer(args.model_path)
    model = lora_model(args.model_path)
    rss_model = rss_mb()
    pairs = synthetic_pairs(tokenizer, args.pairs, args.max_length)
    samples, _ = prefer_samples(tokenizer, pairs, args.max_length)
    batches = json.loads(Path(args.batches).read_text())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    meter = TokenMeter(model)
    times = [time.perf_counter()]
    for idx in batches:
        chosen = [samples[i] for i in idx]
        sequences, row_sample, row_slot = flatten_sequences(chosen)
        batch = pad_sequences(sequences, tokenizer.pad_token_id)
        kinds = torch.full((len(chosen),), int(SampleKind.PREFER))
        policy = gather_pairs(response_logps(forward_logits(model, batch), batch), row_sample, row_slot, len(chosen))
        loss = conflict_losses(kinds, policy, torch.zeros_like(policy), BETA).mean()  # no reference pass
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return summarize(
        "baseline",
        times,
        meter,
        args.warmup,
        args.steps,
        {"rss_after_imports_mb": rss_imports, "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb()},
    )


def child_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from trace_realign.core.modeling import load_model, load_tokenizer
    from trace_realign.core.tokenization import render_prompt

    rss_imports = rss_mb()
    tokenizer = load_tokenizer(args.model_path)
    model = load_model(args.model_path)
    rss_model = rss_mb()
    pairs = synthetic_pairs(tokenizer, args.pairs, args.max_length)
    # The prompt pre-rendered with the chat template (the same text TRACE's Encoder renders), as
    # non-conversational TRL data: TRL appends the EOS text to each completion, so both trainers
    # see the same token sequences (checked by the parent through the per-step token counts).
    data = Dataset.from_list(
        [{"prompt": render_prompt(tokenizer, p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(LORA["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_steps=args.warmup + args.steps,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=args.max_length,
            precompute_ref_log_probs=False,  # TRL's default: reference forward inside every step
            gradient_checkpointing=False,  # TRL defaults to True; TRACE runs without
            bf16=False,  # TRL defaults to bf16 autocast; TRACE runs fp32
            disable_dropout=False,  # keep LoRA dropout 0.1, as TRACE does
            use_cpu=True,
            report_to="none",
            logging_steps=args.warmup + args.steps,
            save_strategy="no",
            seed=SEED,
            data_seed=SEED,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=True,
        )
        times: list[float] = []
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[step_timer_callback(times)],
        )
        meter = TokenMeter(trainer.model)
        trainer.train()
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        lora_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return summarize(
        "trl",
        times,
        meter,
        args.warmup,
        args.steps,
        {
            "rss_after_imports_mb": rss_imports,
            "rss_after_model_mb": rss_model,
            "peak_rss_mb": peak_rss_mb(),
            "trl_version": trl.__version__,
            "trainable_params": lora_params,
            "loss": loss,
        },
    )


def child_mixed(args) -> dict:
    """The TRACE objective on a mixed batch: a third INVERT, a third PUNISH, a third RETAIN."""
    from trace_realign.core.data import PreferencePair
    from trace_realign.core.modeling import load_tokenizer
    from trace_realign.core.config import TriageConfig, WeightsConfig
    from trace_realign.core.reference import run_reference_stage
    from trace_realign.core.training import train
    from trace_realign.core.triage import triage_pairs

    rss_imports = rss_mb()
    tokenizer = load_tokenizer(args.model_path)
    model = lora_model(args.model_path)
    rss_model = rss_mb()
    pairs = [PreferencePair.create(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(tokenizer, args.pairs, args.max_length)]
    verdicts = [(False, True), (False, False), (True, False)]  # INVERT, PUNISH, RETAIN
    triaged = triage_pairs(pairs, [verdicts[i % 3][0] for i in range(len(pairs))], [verdicts[i % 3][1] for i in range(len(pairs))])
    settings = base_settings(args)
    t0 = time.perf_counter()
    ref = run_reference_stage(
        model, tokenizer, triaged, settings, WeightsConfig(gold_size=min(24, len(pairs)), batch_size=2 * args.batch_size), TriageConfig(), seed=SEED
    )
    ref_seconds = time.perf_counter() - t0
    meter = TokenMeter(model)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="trace-mixed-bench-") as out:
        result = train(model, tokenizer, ref.samples, settings, out, seed=SEED, progress=False, callbacks=[step_timer_callback(times)])
    return summarize(
        "mixed",
        times,
        meter,
        args.warmup,
        args.steps,
        {
            "rss_after_imports_mb": rss_imports,
            "rss_after_model_mb": rss_model,
            "peak_rss_mb": peak_rss_mb(),
            "reference_stage_seconds": ref_seconds,
            "reference_stats": ref.stats,
            "loss": [h["loss"] for h in result.log_history if "loss" in h],
        },
    )


CHILDREN = {"trace": child_trace, "baseline": child_baseline, "trl": child_trl, "mixed": child_mixed}


# --------------------------------------------------------------------------- parent


def run_child(name: str, args, extra: list[str] = ()) -> dict:
    with tempfile.NamedTemporaryFile(prefix=f"train-step-{name}-", suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", out,
        "--model-path", str(args.model_path), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--pairs", str(args.pairs),
        "--lr", str(args.lr), "--threads", str(args.threads), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"child '{name}' failed with exit code {proc.returncode}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["process_wall_seconds"] = wall
    print(
        f"  {name:<8} done in {wall:6.1f} s: {result['tokens_per_s']:8.1f} tok/s, peak RSS {result['peak_rss_mb']:7.0f} MB, "
        f"load avg {result['loadavg']}",
        flush=True,
    )
    return result


def main(argv=None):
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
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        warnings.filterwarnings("ignore")
        common_imports()
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        load_start = os.getloadavg()[0]
        result = CHILDREN[args.child](args)
        result["torch_threads"] = torch.get_num_threads()
        result["loadavg"] = (round(load_start, 2), round(os.getloadavg()[0], 2))
        Path(args.child_out).write_text(json.dumps(result))
        return

    if (args.warmup + args.steps) * args.batch_size > args.pairs:
        p.error("--pairs must cover (warmup + steps) * batch-size pairs (one epoch, no pair seen twice)")

    from trace_realign.core.assets import prepare_model
    from trace_realign.core.errors import TraceError

    if args.model is None:
        try:
            args.model_path, model_name = prepare_model("smollm2-135m-instruct"), "smollm2-135m-instruct"
        except TraceError as exc:
            print(f"SmolLM2-135M-Instruct unavailable ({exc}); using tiny-random")
            args.model_path, model_name = prepare_model("tiny-random"), "tiny-random"
    else:
        from trace_realign.core.assets import resolve_model

        args.model_path, model_name = resolve_model(args.model), args.model

    import peft
    import torch
    import transformers
    import trl

    print(f"model: {model_name} ({args.model_path})")
    print(
        f"settings: {args.batch_size} pairs/step ({2 * args.batch_size} sequences), max_length {args.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, lr {args.lr} constant, beta {BETA}, fp32, "
        f"no gradient checkpointing, LoRA r {LORA['r']} alpha {LORA['alpha']} dropout {LORA['dropout']} "
        f"on {'+'.join(LORA['target_modules'])}, {args.pairs} synthetic pairs"
    )
    print(
        f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}; {os.cpu_count()} CPUs"
    )
    print("running each configuration in its own process:", flush=True)

    # Speed runs alternate TRACE and TRL (--repeats rounds) and each configuration keeps its best
    # round: on a shared 2-core machine other processes can steal CPU time from any one run.
    runs: dict[str, list[dict]] = {"trace": [], "trl": [], "baseline": [], "mixed": []}
    for round_ in range(args.repeats):
        runs["trace"].append(run_child("trace", args))
        if round_ == 0:
            with tempfile.NamedTemporaryFile("w", prefix="train-step-batches-", suffix=".json", delete=False) as fh:
                json.dump(runs["trace"][0]["batch_pairs"], fh)
                batches_path = fh.name
            try:
                runs["baseline"].append(run_child("baseline", args, ["--batches", batches_path]))
            finally:
                os.unlink(batches_path)
        runs["trl"].append(run_child("trl", args))
        if args.mixed:
            runs["mixed"].append(run_child("mixed", args))
    res = {}
    for key, items in runs.items():
        if items:
            best = dict(max(items, key=lambda r: r["tokens_per_s"]))
            best["all_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in items]
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in items)
            best["loads"] = [r["loadavg"] for r in items]
            res[key] = best

    tr, tl, bl = res["trace"], res["trl"], res["baseline"]
    same_tokens = tr["tokens_per_step"] == tl["tokens_per_step"]
    print()
    print(f"{'configuration':<44} {'tok/s':>8} {'timed tok':>10} {'timed s':>8} {'peak RSS MB':>12} {'RSS model MB':>13}")
    labels = {
        "trace": "TRACE trainer (precomputed ref log-probs)",
        "trl": "TRL DPOTrainer (ref forward every step)",
        "baseline": "baseline: 1 LoRA model fwd+bwd+AdamW",
        "mixed": "TRACE trainer, mixed INVERT/PUNISH/RETAIN",
    }
    for key in ("trace", "trl", "baseline", "mixed"):
        if key in res:
            r = res[key]
            print(
                f"{labels[key]:<44} {r['tokens_per_s']:8.1f} {r['timed_tokens']:10d} {r['timed_seconds']:8.2f} "
                f"{r['peak_rss_mb']:12.0f} {r['rss_after_model_mb']:13.0f}"
            )
    print()
    for key in ("trace", "trl", "baseline", "mixed"):
        if key in res:
            r = res[key]
            print(
                f"{key:<8} tok/s per round {r['all_tokens_per_s']}  best round: step seconds {r['step_seconds']}  "
                f"tokens/step {r['tokens_per_step']}  shapes {r['batch_shapes']}  1-min load avg at start/end {r['loads']}"
            )
    print(f"trace loss {tr['loss']}  trl loss {tl['loss']}")
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
    print(f"trace_tokens_per_s={tr['tokens_per_s']:.2f}")
    print(f"trl_tokens_per_s={tl['tokens_per_s']:.2f}")
    print(f"trace_peak_rss_mb={tr['peak_rss_mb']:.0f}")
    print(f"baseline_peak_rss_mb={bl['peak_rss_mb']:.0f}")
    print(f"trl_peak_rss_mb={tl['peak_rss_mb']:.0f}")
    print(f"train_peak_memory_ratio={tr['peak_rss_mb'] / bl['peak_rss_mb']:.4f}")
    print(f"train_speed_ratio_vs_trl={tr['tokens_per_s'] / tl['tokens_per_s']:.4f}")


if __name__ == "__main__":
    main()
