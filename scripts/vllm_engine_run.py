"""Judge and generate with offline vLLM engines, in .venv-vllm (made by ``bash scripts/setup.sh --vllm``).

Reads one JSON job, writes one JSON result; the tests and benchmarks/vllm_vs_transformers.py run it
from the main venv as a subprocess (vLLM needs its own transformers range, see scripts/setup_vllm.sh):

    .venv-vllm/bin/python scripts/vllm_engine_run.py JOB.json RESULT.json

Job keys (all optional except ``model``):
  model            the judge's and the base model's folder
  policy_path      the policy file the judge judges under
  judge            the vllm judge's settings beyond backend and model (e.g. shard_size, max_model_len)
  items            [[prompt, response], ...] to judge, through the verdict cache at ``cache_path``
  compare          [[prompt, response_a, response_b], ...] to compare
  correct          how many of ``items`` to rewrite (first ones)
  adapter          a LoRA adapter folder: generate ``prompts`` with the base and with the adapter
  prompts          evaluation prompts (strings or chat message lists)
  max_new_tokens   tokens generated per prompt (default 96)

Result keys: ``verdicts`` (compliant, confidence, raw per item), ``stats``, ``rerun_stats`` and
``rerun_same`` (the same items judged again through the cache), ``shard_calls`` (engine calls of the
first pass), ``comparisons``, ``corrections``, ``judge_seconds``, ``judge_load_seconds``, and
``reference``, ``realigned``, ``reference_seconds``, ``realigned_seconds``, ``generator_load_seconds``.
One engine at a time: the judge's is released before the generator's loads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def judge_part(job: dict, out: dict) -> None:
    """The vllm judge on ``job``'s items, comparisons and corrections; fills ``out``."""
    from trace_realign.core.oracle import JudgeItem, VerdictCache, judge_with_cache, make_judge
    from trace_realign.core.oracle.base import ComparisonItem
    from trace_realign.core.policy import load_policy

    policy = load_policy(job["policy_path"])
    t0 = time.perf_counter()
    judge = make_judge({**job.get("judge", {}), "backend": "vllm", "model": job["model"]})
    out["judge_load_seconds"] = time.perf_counter() - t0
    engine_generate = judge.llm.generate
    calls: list[int] = []

    def counted(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return engine_generate(prompts, *args, **kwargs)

    judge.llm.generate = counted
    items = [JudgeItem(prompt=p, response=r) for p, r in job.get("items", [])]
    with VerdictCache(Path(job["cache_path"])) as cache:
        t0 = time.perf_counter()
        verdicts, stats = judge_with_cache(judge, items, policy, cache)
        out["judge_seconds"] = time.perf_counter() - t0
        out["shard_calls"] = list(calls)
        again, rerun_stats = judge_with_cache(judge, items, policy, cache)
    out["verdicts"] = [{"compliant": v.compliant, "confidence": v.confidence, "raw": v.raw} for v in verdicts]
    out["stats"], out["rerun_stats"] = dict(stats), dict(rerun_stats)
    out["rerun_same"] = [(a.compliant, a.confidence) for a in again] == [(v.compliant, v.confidence) for v in verdicts]
    if job.get("compare"):
        found = judge.compare([ComparisonItem(*c) for c in job["compare"]], policy)
        out["comparisons"] = [{"winner": c.winner, "raw": c.raw} for c in found]
    if job.get("correct"):
        out["corrections"] = judge.correct(items[: job["correct"]], policy)
    judge.close()


def generate_part(job: dict, out: dict) -> None:
    """The vllm generator on ``job``'s prompts, base and adapter; fills ``out``."""
    from trace_realign.core.evaluation.generation import MAX_PROMPT_LENGTH
    from trace_realign.core.evaluation.vllm_generation import VLLMGenerator
    from trace_realign.core.modeling import load_tokenizer

    max_new_tokens = job.get("max_new_tokens", 96)
    t0 = time.perf_counter()
    with VLLMGenerator(job["model"], adapter=job["adapter"], max_model_len=MAX_PROMPT_LENGTH + max_new_tokens) as generator:
        out["generator_load_seconds"] = time.perf_counter() - t0
        found = generator.reference_and_realigned(load_tokenizer(job["model"]), job["prompts"], max_new_tokens=max_new_tokens)
    out["reference"], out["realigned"], out["reference_seconds"], out["realigned_seconds"] = found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_engine_run.py JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    out: dict = {}
    if job.get("items"):
        judge_part(job, out)
    if job.get("prompts"):
        generate_part(job, out)
    Path(argv[1]).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from rerunning this
    sys.exit(main(sys.argv[1:]))
