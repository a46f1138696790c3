"""Sweep the demo's settings (old alignment + TRACE) with trace_core alone, no Prefect or MLflow.

How configs/demo.yaml's training settings were chosen. Each grid entry runs, on the real model:
the old alignment (plain DPO on data/demo/pairs.jsonl, merged), the annotation judge and triage
under the new policy, the reference stage (gold batch, impact weights), TRACE training, and
generation on the held-out prompts before (the old-aligned model) and after; plus the utility
proxy on held-out RETAIN pairs. It writes one JSON with every generation and number, to be
judged afterwards (``--judge`` runs the local embedding judge on it; it needs the MiniLM package).

    python scripts/demo_sweep.py --grid grid.json --out .trace/sweep [--device cuda]
    python scripts/demo_sweep.py --judge .trace/sweep/sweep.json

grid.json: {"old": {"<name>": {"method": "dpo" or "sft", DpoConfig or AlignmentConfig fields}} ("base" needs no entry:
TRACE on the base model), "trace": {"<name>": {TrainingConfig fields, "weights": {WeightsConfig fields}}},
"runs": [["<old name>", "<trace name>"], ...]}. Runs on a CPU too, slowly.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trace_realign.core.alignment import dpo_align, sft_align  # noqa: E402
from trace_realign.core.config import AlignmentConfig, DpoConfig, TrainingConfig, TriageConfig, WeightsConfig  # noqa: E402
from trace_realign.core.data import load_pairs  # noqa: E402
from trace_realign.core.evaluation import generate, utility_proxy  # noqa: E402
from trace_realign.core.modeling import add_lora, load_model, load_tokenizer  # noqa: E402
from trace_realign.core.oracle import JudgeItem, judge_items, make_judge  # noqa: E402
from trace_realign.core.policy import load_policy  # noqa: E402
from trace_realign.core.reference import run_reference_stage  # noqa: E402
from trace_realign.core.training import train  # noqa: E402
from trace_realign.core.triage import TriageType, is_holdout, triage_pairs  # noqa: E402

TRACE_DEFAULTS = {  # TrainingConfig overrides (LoRA: the authors' defaults)
    "beta": 0.3,
    "alpha_kl": 0.1,
    "learning_rate": 5e-4,
    "lr_scheduler": "cosine",
    "warmup_steps": 8,
    "num_train_epochs": 1.0,
    "per_device_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_length": 192,
    "logging_steps": 4,
}
WEIGHTS_DEFAULTS = {"gold_size": 64, "enabled": True, "batch_size": 16}  # WeightsConfig overrides


def triaged_split(pairs, policy, holdout_fraction=0.1):
    judge = make_judge({"backend": "annotations"})
    items = judge_items(pairs)
    verdicts = judge.judge(items, policy)
    triaged = triage_pairs(pairs, [v.compliant for v in verdicts[0::2]], [v.compliant for v in verdicts[1::2]])
    train_split = [t for t in triaged if not is_holdout(t.pair.pair_id, holdout_fraction)]
    holdout = [t for t in triaged if is_holdout(t.pair.pair_id, holdout_fraction)]
    return train_split, holdout


def run_trace(old_model, tokenizer, train_split, holdout, prompts, cfg, gen_kwargs, work):
    cfg = dict(cfg)
    weights = WeightsConfig(**{**WEIGHTS_DEFAULTS, **cfg.pop("weights", {})})
    training = TrainingConfig(**{**TRACE_DEFAULTS, **cfg})
    model = add_lora(copy.deepcopy(old_model), training.lora, seed=0)
    t0 = time.perf_counter()
    ref = run_reference_stage(model, tokenizer, train_split, training, weights, TriageConfig())
    t1 = time.perf_counter()
    result = train(model, tokenizer, ref.samples, training, work, progress=False)
    t2 = time.perf_counter()
    after = generate(model, tokenizer, prompts, **gen_kwargs)
    retain = [t for t in holdout if t.type is TriageType.RETAIN]
    utility = utility_proxy(model, tokenizer, [t.pair.prompt for t in retain], [t.pair.chosen for t in retain], max_length=training.max_length)
    t3 = time.perf_counter()
    return {
        "settings": {"training": training.model_dump(mode="json"), "weights": weights.model_dump(mode="json")},
        "steps": result.global_step,
        "log": [h for h in result.log_history if "loss" in h],
        "after": after,
        "utility": utility,
        "seconds": {"reference": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2},
    }


def sweep(args):
    import torch

    from trace_realign.core.assets import resolve_model

    grid = json.loads(Path(args.grid).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = resolve_model(args.model)
    tokenizer = load_tokenizer(base_path)
    pairs = load_pairs(ROOT / "data/demo/pairs.jsonl").pairs
    policy = load_policy(ROOT / "configs/policies/new.md")
    train_split, holdout = triaged_split(pairs, policy)
    prompts_rows = [json.loads(line) for line in (ROOT / "data/demo/heldout_prompts.jsonl").read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in prompts_rows]
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "batch_size": args.gen_batch_size}
    report = {"prompts": prompts_rows, "device": args.device, "torch": torch.__version__, "old": {}, "runs": []}
    base = load_model(base_path, "float32", args.device)
    t0 = time.perf_counter()
    report["base_generations"] = generate(base, tokenizer, prompts, **gen_kwargs)
    report["base_generation_seconds"] = time.perf_counter() - t0
    olds = {}
    for old_name in dict.fromkeys(r[0] for r in grid["runs"]):
        if old_name == "base":  # TRACE straight on the base model, no old alignment
            olds[old_name] = base
            report["old"][old_name] = {"generations": report["base_generations"], "final": {}}
            continue
        cfg = grid["old"][old_name]
        cfg = dict(cfg)
        if cfg.pop("method", "dpo") == "sft":
            align, settings = sft_align, AlignmentConfig(**cfg)
        else:
            align, settings = dpo_align, DpoConfig(**cfg)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            old, res = align(copy.deepcopy(base), tokenizer, pairs, settings, tmp)
        t1 = time.perf_counter()
        gens = generate(old, tokenizer, prompts, **gen_kwargs)
        report["old"][old_name] = {
            "settings": settings.model_dump(mode="json"),
            "steps": res.global_step,
            "final": res.final,
            "generations": gens,
            "seconds": {"train": t1 - t0, "generate": time.perf_counter() - t1},
        }
        olds[old_name] = old
        (out / "sweep.json").write_text(json.dumps(report, indent=1))
        print(f"old {old_name}: {res.global_step} steps {t1 - t0:.1f}s final {res.final}", flush=True)
    for old_name, trace_name in grid["runs"]:
        if trace_name is None:  # the old alignment alone
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = run_trace(olds[old_name], tokenizer, train_split, holdout, prompts, grid["trace"][trace_name], gen_kwargs, tmp)
        r.update({"old": old_name, "trace": trace_name})
        report["runs"].append(r)
        print(f"run {old_name}/{trace_name}: {r['steps']} steps utility {r['utility']['perplexity_ratio']:.3f} {r['seconds']}", flush=True)
        (out / "sweep.json").write_text(json.dumps(report, indent=1))
    (out / "sweep.json").write_text(json.dumps(report, indent=1))


def judge_report(path):
    """TPA of every generation set in a sweep report by the local embedding judge."""
    from trace_realign.core.evaluation import local_judge_from_verdicts

    report = json.loads(Path(path).read_text())
    pairs = load_pairs(ROOT / "data/demo/pairs.jsonl").pairs
    policy = load_policy(ROOT / "configs/policies/new.md")
    train_split, _ = triaged_split(pairs, policy)
    judge = local_judge_from_verdicts(train_split, policy, seed=0)
    quality = judge.held_out
    prompts = [r["prompt"] for r in report["prompts"]]
    groups = [r["group"] for r in report["prompts"]]

    def tpa(gens):
        verdicts = judge.judge([JudgeItem(p, g) for p, g in zip(prompts, gens)], policy)
        ok = [v.compliant for v in verdicts]
        by = {}
        for g, c in zip(groups, ok):
            by.setdefault(g, []).append(c)
        return round(100 * sum(ok) / len(ok), 1), {g: round(100 * sum(v) / len(v), 1) for g, v in by.items()}

    print(f"judge held-out accuracy {quality}")
    print("base", tpa(report["base_generations"]))
    for name, old in report["old"].items():
        print("old", name, tpa(old["generations"]), old["final"])
    for r in report["runs"]:
        print("run", r["old"], r["trace"], tpa(r["after"]), f"utility {r['utility']['perplexity_ratio']:.3f}", {k: round(v) for k, v in r["seconds"].items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid")
    ap.add_argument("--out", default=".trace/sweep")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch-size", type=int, default=8)
    ap.add_argument("--judge", help="a sweep.json to judge with the local embedding judge")
    args = ap.parse_args()
    if args.judge:
        judge_report(args.judge)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
