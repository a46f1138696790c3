"""Benchmark: vLLM (CPU build, .venv-vllm) against transformers for evaluation generation and judging.

Generation: the demo's 54 evaluation prompts (configs/demo.yaml: its model, max_new_tokens and
generation batch size), greedy, for the reference (the base) and the realigned model (a LoRA adapter
of the demo's rank on it: fresh, so it answers as the base; the LoRA computation is what is timed),
with ``evaluation.generator: vllm`` (one engine, the adapter as a LoRARequest) and with the
transformers generator. Judging: the demo's first ``--pairs`` pairs (chosen and rejected, so 2
verdicts per pair) under the demo policy, by the vllm judge and by the transformers judge (batch 8),
both on SmolLM2-135M-Instruct in float32. Engine loads are reported apart and not counted in the rates.
The vLLM side runs first, in two subprocesses (scripts/vllm_engine_run.py: the judge, the generator), so the
two never share the cores.

    bash scripts/setup.sh --vllm          # once: .venv-vllm
    .venv/bin/python benchmarks/vllm_vs_transformers.py [--pairs 32]

The last lines are ``key=value``: generation seconds and their ratio (transformers over vLLM), judge
pairs/s and their ratio (vLLM over transformers), and how many generations agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, Stopwatch, offline_environment, print_metric

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
JUDGE_MODEL = "smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32, help="demo pairs judged (2 verdicts each)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed to the vLLM subprocess")
    args = ap.parse_args()
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: create it with `bash scripts/setup.sh --vllm`")
    offline_environment()

    from trace_realign.core.assets import prepare_model
    from trace_realign.core.data import load_pairs, load_prompts
    from trace_realign.core.evaluation import generate_reference_and_realigned
    from trace_realign.core.modeling import add_lora, load_model, load_tokenizer, save_adapter
    from trace_realign.core.oracle import JudgeItem, make_judge
    from trace_realign.core.policy import load_policy
    from trace_realign.flows.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    evaluation = cfg.evaluation
    prompts, _ = load_prompts(evaluation.prompts_path)
    prompts = prompts[: evaluation.max_prompts]
    pairs = load_pairs(cfg.data.path, limit=args.pairs).pairs
    items = [[p.prompt, response] for p in pairs for response in (p.chosen, p.rejected)]
    base, judge_model = prepare_model(cfg.model.path), prepare_model(JUDGE_MODEL)
    print(f"{len(prompts)} prompts x {evaluation.max_new_tokens} new tokens on {cfg.model.path} (LoRA r {cfg.training.lora.r}); "
          f"{len(pairs)} pairs judged by {JUDGE_MODEL}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = add_lora(load_model(base), cfg.training.lora, seed=cfg.run.seed)
        adapter = save_adapter(model, tmp / "adapter")
        job = {
            "model": str(judge_model), "policy_path": str(cfg.policy.path),
            "judge": {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048},
            "items": items, "cache_path": str(tmp / "verdicts.sqlite"),
        }  # fmt: skip
        gen_job = {"model": str(base), "adapter": str(adapter), "prompts": prompts, "max_new_tokens": evaluation.max_new_tokens}
        # Two jobs, one subprocess each: the judge's and the generator's engines are different models.
        results = {}
        for name, body in (("judge", job), ("generate", gen_job)):
            (tmp / f"{name}.json").write_text(json.dumps(body))
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
            subprocess.run(
                [str(VLLM_PYTHON), str(ROOT / "scripts" / "vllm_engine_run.py"), str(tmp / f"{name}.json"), str(tmp / f"{name}-out.json")],
                check=True, timeout=args.timeout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            results[name] = json.loads((tmp / f"{name}-out.json").read_text())
        vllm_judge, vllm_gen = results["judge"], results["generate"]

        tokenizer = load_tokenizer(base)
        with Stopwatch() as gen_clock:
            reference, realigned, _, _ = generate_reference_and_realigned(
                model, tokenizer, prompts, max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size
            )
        judge = make_judge({"backend": "transformers", "model_path": str(judge_model), "dtype": "float32", "device": "cpu"})
        with Stopwatch() as judge_clock:
            verdicts = judge.judge([JudgeItem(p, r) for p, r in items], load_policy(cfg.policy.path))

    vllm_gen_s = vllm_gen["reference_seconds"] + vllm_gen["realigned_seconds"]
    same = sum(a == b for a, b in zip(vllm_gen["reference"] + vllm_gen["realigned"], reference + realigned))
    agree = sum(v["compliant"] == w.compliant for v, w in zip(vllm_judge["verdicts"], verdicts))
    print(f"vLLM engine loads: judge {vllm_judge['judge_load_seconds']:.1f} s, generator {vllm_gen['generator_load_seconds']:.1f} s")
    print_metric("generation_seconds_transformers", gen_clock.seconds, ".1f")
    print_metric("generation_seconds_vllm", vllm_gen_s, ".1f")
    print_metric("generation_ratio_transformers_over_vllm", gen_clock.seconds / vllm_gen_s, ".2f")
    print_metric("generations_identical", same, "d")
    print_metric("generations_total", 2 * len(prompts), "d")
    print_metric("judge_pairs_per_s_transformers", len(pairs) / judge_clock.seconds, ".2f")
    print_metric("judge_pairs_per_s_vllm", len(pairs) / vllm_judge["judge_seconds"], ".2f")
    print_metric("judge_ratio_vllm_over_transformers", judge_clock.seconds / vllm_judge["judge_seconds"], ".2f")
    print_metric("judge_verdicts_agreeing", agree, "d")


if __name__ == "__main__":
    main()
