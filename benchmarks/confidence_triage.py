"""Confidence-aware triage measured (issue 15): does ``triage.min_confidence`` (with or without an
``oracle.fallback`` judge) and ``weights.confidence`` make the triaged training set more correct?

Part 1, a synthetic judge of known error, on the smoke pairs (36) and the demo pairs (333), gold
from their annotations under the shipped policies (the annotations judge). Every verdict the gold
labels know is wrong with probability ``--error`` (0.2); its confidence is drawn

- informative: correct verdicts 0.5 + 0.5 * Beta(3, 1) (mean 0.875), wrong verdicts
  0.5 + 0.5 * Beta(1.5, 1.5) (mean 0.75): the two overlap over the whole range (AUROC about 0.78);
- uninformative: every verdict 0.5 + 0.5 * Beta(3, 1) (the confidence says nothing about the error).

The fallback judge is a second synthetic judge with error 0.05 and informative confidences. Each
figure is pooled over ``--seeds`` draws; the verdicts go through the library's own triage
(``triage_from_verdicts``) and fallback (``judge_with_fallback``). Reported per threshold: pair
coverage (share of pairs with a gold type that triage does not leave UNKNOWN), triage accuracy on
the covered pairs (type equal to the gold type), wrong pairs that reach training, and for the
fallback the verdicts it was asked. ``conflict weight on wrong`` is the share of the conflict
samples' weight (impact weighting off, so w_i = c_i / sum c_k with weights.confidence) that lands on
pairs of the wrong type, without and with ``weights.confidence`` (pooled over the draws).

Part 2, a real judge with log-probs: the transformers judge with the packaged
SmolLM2-135M-Instruct on the first ``--llm-pairs`` demo pairs (gold as above): verdict accuracy
against the gold labels at each threshold (selective accuracy) and the share kept (coverage).

    .venv/bin/python benchmarks/confidence_triage.py [--seeds 200] [--llm-pairs 100] [--no-llm]

TPA after training is not measured here: on the smoke config's tiny random model TPA is noise, and
the demo's training takes about 16 minutes per variant on 2 cores.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import random
import statistics
import time
from collections.abc import Sequence

import common

SCHEMES = {
    "informative": ((3.0, 1.0), (1.5, 1.5)),  # Beta (a, b) of (correct, wrong) verdicts' confidence, on [0.5, 1]
    "uninformative": ((3.0, 1.0), (3.0, 1.0)),
}
THRESHOLDS = (None, 0.6, 0.7, 0.8, 0.9)
DATASETS = {"smoke": ("data/smoke/pairs.jsonl", "configs/policies/smoke-new.md"), "demo": ("data/demo/pairs.jsonl", "configs/policies/new.md")}


def load(name: str):
    """(pairs, gold verdicts [(chosen, rejected)], gold triage types) of a shipped data set."""
    from trace_realign.core.data import load_pairs
    from trace_realign.core.oracle.verdicts import gold_from_annotations
    from trace_realign.core.policy import load_policy
    from trace_realign.core.triage import triage

    data, policy_path = DATASETS[name]
    pairs = load_pairs(common.ROOT / data).pairs
    policy = load_policy(common.ROOT / policy_path)
    gold = gold_from_annotations(pairs, policy)
    return pairs, policy, gold, triage([c for c, _ in gold], [r for _, r in gold])


def synthetic_judge(gold: dict, error: float, scheme: str, seed: int, name: str):
    """A judge that gives the gold verdict of an item, wrong with probability ``error``, with a
    confidence drawn from ``SCHEMES[scheme]`` (deterministic per item, seed and name)."""
    from trace_realign.core.oracle.base import Judge, Verdict
    from trace_realign.core.oracle.cache import item_key

    shapes = SCHEMES[scheme]

    class Synthetic(Judge):
        backend = "synthetic"
        cacheable = False

        @property
        def identity(self) -> str:
            return f"synthetic:{name}:{error}:{scheme}:{seed}"

        def judge(self, items, policy, on_result=None):
            out = []
            for item in items:
                key = item_key(item)
                truth = gold.get(key)
                if truth is None:
                    out.append(Verdict.unknown("no gold label"))
                    continue
                rng = random.Random(hashlib.sha256(f"{self.identity}|{key}".encode()).digest())
                wrong = rng.random() < error
                a, b = shapes[1] if wrong else shapes[0]
                out.append(Verdict(compliant=truth != wrong, confidence=0.5 + 0.5 * rng.betavariate(a, b), raw="synthetic"))
            return out

        def correct(self, items, policy, on_result=None):
            return [None] * len(items)

    return Synthetic()


def pair_figures(types, gold_types, triaged) -> dict[str, float]:
    """Counts over the pairs whose gold type is known, to pool over draws: known, covered (not
    UNKNOWN), right (type equal to the gold type), conflict samples and wrong ones among them, and
    the confidence factors' sum over conflict samples and over the wrong ones."""
    from trace_realign.core.reference import confidence_factor
    from trace_realign.core.triage import CONFLICT, TriageType

    known = [i for i, g in enumerate(gold_types) if g is not TriageType.UNKNOWN]
    covered = [i for i in known if types[i] is not TriageType.UNKNOWN]
    right = sum(types[i] is gold_types[i] for i in covered)
    conflict = [i for i in covered if types[i] in CONFLICT]
    factors = {i: confidence_factor(triaged[i]) for i in conflict}
    wrong_conflict = [i for i in conflict if types[i] is not gold_types[i]]
    return {
        "known": len(known),
        "covered": len(covered),
        "right": right,
        "conflict": len(conflict),
        "conflict_wrong": len(wrong_conflict),
        "factor": sum(factors.values()),
        "factor_wrong": sum(factors[i] for i in wrong_conflict),
    }


def synthetic_study(name: str, seeds: int, error: float, folder) -> None:
    from trace_realign.core.oracle import VerdictCache, judge_items, judge_with_fallback
    from trace_realign.core.oracle.cache import item_key
    from trace_realign.core.oracle.verdicts import triage_from_verdicts, verdict_table

    pairs, policy, gold, gold_types = load(name)
    items = judge_items(pairs)
    truth = {}
    for it, g in zip(items, [v for pair in gold for v in pair]):
        if g is not None:
            truth[item_key(it)] = g
    known_pairs = sum(t.value != "unknown" for t in gold_types)
    print(f"\n{name}: {len(pairs)} pairs, {known_pairs} with a gold triage type; judge error {error:.0%}; {seeds} seeds")
    header = f"{'confidence':<14} {'threshold':>9} {'fallback':>8} {'coverage':>9} {'accuracy':>9} {'wrong pairs':>11} {'asked':>6} {'w on wrong':>11} {'scaled':>7}"
    print(header)
    with VerdictCache(folder / f"{name}.sqlite") as cache:
        for scheme in SCHEMES:
            ok, bad = [], []
            for seed in range(min(seeds, 20)):
                for it, v in zip(items, synthetic_judge(truth, error, scheme, seed, "primary").judge(items, policy)):
                    if v.known:
                        (ok if v.compliant == truth[item_key(it)] else bad).append(v.confidence)
            print(f"{scheme}: AUROC of confidence for 'verdict is correct' {auroc(ok, bad):.3f}")
            for threshold in THRESHOLDS:
                for with_fallback in ((False, True) if threshold is not None else (False,)):
                    runs = []
                    for seed in range(seeds):
                        judge = synthetic_judge(truth, error, scheme, seed, "primary")
                        second = synthetic_judge(truth, 0.05, "informative", seed, "fallback") if with_fallback else None
                        verdicts, judges, stats = judge_with_fallback(
                            judge, items, policy, cache, fallback=second, min_confidence=threshold
                        )
                        rows = verdict_table(pairs, verdicts, judge.identity, policy.sha256, judges).to_pylist()
                        triaged = triage_from_verdicts(pairs, rows, min_confidence=threshold)
                        figures = pair_figures([t.type for t in triaged], gold_types, triaged)
                        figures["asked"] = stats.get("fallback_asked", 0)
                        runs.append(figures)
                    total = {k: sum(r[k] for r in runs) for k in runs[0]}
                    mean = {
                        "coverage": total["covered"] / total["known"],
                        "accuracy": total["right"] / max(1, total["covered"]),
                        "wrong": (total["covered"] - total["right"]) / seeds,
                        "asked": total["asked"] / seeds,
                        "w_wrong_uniform": total["conflict_wrong"] / max(1, total["conflict"]),
                        "w_wrong_scaled": total["factor_wrong"] / max(1e-12, total["factor"]),
                    }
                    print(
                        f"{scheme:<14} {'off' if threshold is None else threshold:>9} {'yes' if with_fallback else 'no':>8} "
                        f"{mean['coverage']:>9.1%} {mean['accuracy']:>9.1%} {mean['wrong']:>11.1f} {mean['asked']:>6.1f} "
                        f"{mean['w_wrong_uniform']:>11.1%} {mean['w_wrong_scaled']:>7.1%}"
                    )
                    tag = f"{name}_{scheme}_{'off' if threshold is None else threshold}{'_fallback' if with_fallback else ''}"
                    common.print_metric(f"{tag}_accuracy", mean["accuracy"])
                    common.print_metric(f"{tag}_coverage", mean["coverage"])


def llm_study(n_pairs: int, folder) -> None:
    """The transformers judge (SmolLM2-135M-Instruct) on the first ``n_pairs`` demo pairs."""
    from trace_realign.core.oracle import VerdictCache, judge_items, judge_with_cache, make_judge
    from trace_realign.core.oracle.verdicts import triage_from_verdicts, verdict_table
    from trace_realign.core.triage import TriageType

    name, path = common.choose_model(None)
    pairs, policy, gold, gold_types = load("demo")
    pairs, gold, gold_types = pairs[:n_pairs], gold[:n_pairs], gold_types[:n_pairs]
    items = judge_items(pairs)
    truth = [v for pair in gold for v in pair]
    judge = make_judge({"backend": "transformers", "model_path": str(path), "dtype": "float32", "device": "cpu"})
    t0 = time.perf_counter()
    with VerdictCache(folder / "llm.sqlite") as cache:
        verdicts, _ = judge_with_cache(judge, items, policy, cache)
    seconds = time.perf_counter() - t0
    judged = [(v, g) for v, g in zip(verdicts, truth) if g is not None and v.known]
    compliant_share = sum(g for _, g in judged) / max(1, len(judged))
    ok = [v.confidence for v, g in judged if v.compliant == g and v.confidence is not None]
    bad = [v.confidence for v, g in judged if v.compliant != g and v.confidence is not None]
    print(
        f"\nLLM judge {name} (transformers, CPU) on {len(pairs)} demo pairs: {len(verdicts)} verdicts in {seconds:.0f} s, "
        f"{len(judged)} known with a gold label; {sum(v.compliant for v, _ in judged)} said compliant "
        f"(gold: {compliant_share:.1%} compliant, so always answering the majority scores {max(compliant_share, 1 - compliant_share):.1%})"
    )
    if ok and bad:
        print(f"mean confidence: correct verdicts {statistics.fmean(ok):.3f}, wrong verdicts {statistics.fmean(bad):.3f}")
        print(f"AUROC of confidence for 'verdict is correct': {auroc(ok, bad):.3f} (0.5: uninformative)")
    rows = verdict_table(pairs, verdicts, judge.identity, policy.sha256).to_pylist()
    print(f"{'threshold':>9} {'verdicts kept':>13} {'verdict accuracy':>16} {'pair coverage':>13} {'pair accuracy':>13}")
    thresholds = (None, 0.55, 0.6, 0.7, 0.8, 0.9)
    for threshold in thresholds:
        kept = [(v, g) for v, g in judged if threshold is None or v.confidence is None or v.confidence >= threshold]
        accuracy = sum(v.compliant == g for v, g in kept) / max(1, len(kept))
        triaged = triage_from_verdicts(pairs, rows, min_confidence=threshold)
        known = [i for i, g in enumerate(gold_types) if g is not TriageType.UNKNOWN]
        covered = [i for i in known if triaged[i].type is not TriageType.UNKNOWN]
        pair_accuracy = sum(triaged[i].type is gold_types[i] for i in covered) / max(1, len(covered))
        print(
            f"{'off' if threshold is None else threshold:>9} {len(kept) / max(1, len(judged)):>13.1%} {accuracy:>16.1%} "
            f"{len(covered) / max(1, len(known)):>13.1%} {pair_accuracy:>13.1%}"
        )
        tag = "off" if threshold is None else threshold
        common.print_metric(f"llm_{tag}_verdict_accuracy", accuracy)
        common.print_metric(f"llm_{tag}_verdict_coverage", len(kept) / max(1, len(judged)))
    judge.close()


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a correct verdict's confidence > a wrong one's), ties counting one half."""
    ranked = sorted(negative)
    wins = sum(bisect.bisect_left(ranked, p) + 0.5 * (bisect.bisect_right(ranked, p) - bisect.bisect_left(ranked, p)) for p in positive)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="draws of the synthetic judge per setting")
    parser.add_argument("--error", type=float, default=0.2, help="the synthetic judge's verdict error rate")
    parser.add_argument("--llm-pairs", type=int, default=100, help="demo pairs the SmolLM2 judge reads")
    parser.add_argument("--no-llm", action="store_true", help="skip the real LLM judge")
    args = parser.parse_args()
    common.offline_environment()
    folder = common.fresh_folder("confidence-triage-")
    for name in DATASETS:
        synthetic_study(name, args.seeds, args.error, folder)
    if not args.no_llm:
        llm_study(args.llm_pairs, folder)


if __name__ == "__main__":
    main()
