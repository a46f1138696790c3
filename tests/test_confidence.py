"""Confidence-aware triage: ``triage.min_confidence`` routes low-confidence verdicts to UNKNOWN,
``oracle.fallback`` asks a second judge for them (cached under its own identity), and
``weights.confidence`` scales each sample by the confidence of the verdicts that made its type."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from tests.oracle_fakes import FakeJudgeServer
from tests.test_pipeline import make_config, run_flow
from trace_realign.core.config import LoraConfig, ReferenceTrainingConfig, TriageConfig, WeightsConfig
from trace_realign.core.data import PreferencePair
from trace_realign.core.errors import ConfigError
from trace_realign.core.oracle import JudgeItem, VerdictCache, judge_with_fallback, make_judge
from trace_realign.core.oracle.cache import item_key
from trace_realign.core.oracle.verdicts import triage_from_verdicts
from trace_realign.core.policy import parse_policy
from trace_realign.core.triage import TriageType, confidence_stats, table_to_triaged, triaged_to_table
from trace_realign.flows.config import load_config

I, P, R, U = TriageType.INVERT, TriageType.PUNISH, TriageType.RETAIN, TriageType.UNKNOWN
PAIRS = [PreferencePair.create(f"prompt {i}", f"chosen {i}", f"rejected {i}") for i in range(8)]
# (chosen_compliant, chosen_confidence, rejected_compliant, rejected_confidence) per pair
VERDICTS = [
    (False, 0.9, True, 0.9),  # INVERT, both confident: stays INVERT
    (False, 0.4, True, 0.9),  # c_w below 0.6: UNKNOWN
    (False, None, True, 0.4),  # c_w without confidence (kept), c_l below: UNKNOWN
    (True, 0.9, False, 0.3),  # c_l below, but c_w = 1 settles it: RETAIN
    (True, 0.5, False, 0.9),  # c_w below: UNKNOWN
    (False, None, False, None),  # no confidences (annotations-like): never routed, PUNISH
    (False, 0.6, False, 0.6),  # exactly at the threshold is not below it: PUNISH
    (None, None, True, 0.9),  # already unknown: UNKNOWN, not counted as moved
]


def rows(verdicts=VERDICTS):
    return [
        {"pair_id": p.pair_id, "chosen_compliant": c, "chosen_confidence": cp, "rejected_compliant": r, "rejected_confidence": rp}
        for p, (c, cp, r, rp) in zip(PAIRS, verdicts)
    ]


def test_verdicts_below_the_threshold_count_as_unknown():
    assert [t.type for t in triage_from_verdicts(PAIRS, rows())] == [I, I, I, R, R, P, P, U]
    routed = triage_from_verdicts(PAIRS, rows(), min_confidence=0.6)
    assert [t.type for t in routed] == [I, U, U, R, U, P, P, U]
    # The verdicts as triage used them (routed ones unknown), the confidences as the judge gave them.
    assert [(t.chosen_compliant, t.rejected_compliant) for t in routed[1:5]] == [(None, True), (False, None), (True, None), (None, False)]
    assert [(t.chosen_confidence, t.rejected_confidence) for t in routed[:3]] == [(0.9, 0.9), (0.4, 0.9), (None, 0.4)]
    assert table_to_triaged(triaged_to_table(routed)) == routed


def test_confidence_stats_count_routed_verdicts_unconfident_verdicts_and_moved_pairs():
    compliant = [(c, r) for c, _, r, _ in VERDICTS]
    confidence = [(cp, rp) for _, cp, _, rp in VERDICTS]
    assert confidence_stats(compliant, confidence, 0.6) == {"low_confidence": 4, "no_confidence": 3, "low_confidence_unknown": 3}
    assert confidence_stats(compliant, confidence, None) == {"low_confidence": 0, "no_confidence": 3, "low_confidence_unknown": 0}


def test_noise_swap_moves_the_confidences_with_the_verdicts():
    one = [(False, 0.4, True, 0.9)]  # INVERT; swapped: (True 0.9, False 0.4), RETAIN, whose c_l alone is low
    t = triage_from_verdicts(PAIRS[:1], rows(one), noise=(1.0, "swap", 0), min_confidence=0.6)[0]
    assert (t.type, t.noise, t.chosen_confidence, t.rejected_confidence) == (R, "swap", 0.9, 0.4)


# -- config -----------------------------------------------------------------------------------------


OPENAI = "{backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: null}"


@pytest.mark.parametrize(
    "sets, needle",
    [
        ([f"oracle={OPENAI[:-1]}, fallback: {{backend: annotations}}}}"], "oracle.fallback is asked only for verdicts below triage.min_confidence"),
        (["triage.min_confidence=0"], "setting 'triage.min_confidence': Input should be greater than 0"),
        (["triage.min_confidence=1.5"], "setting 'triage.min_confidence': Input should be less than or equal to 1"),
        (
            ["triage.min_confidence=0.5", "oracle.fallback={backend: openai, model: b, fallback: {backend: annotations}}"],
            "setting 'oracle.fallback': Value error, a fallback judge has no fallback of its own",
        ),
        (["triage.min_confidence=0.5", "oracle.fallback={backend: annotations}"], "fallback: the same judge as the one it backs up"),
        ([f"evaluation.judge={OPENAI[:-1]}, fallback: {{backend: annotations}}}}"], "setting 'evaluation.judge': Value error, fallback is the oracle's setting"),
        (["triage.min_confidence=0.5", "oracle.fallback={backend: transformers}"], "setting 'oracle.fallback.model_path' is required"),
    ],
)
def test_bad_confidence_settings_fail_in_one_line_naming_the_setting(sets, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", sets)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_threshold_under_a_judge_without_confidences_is_a_warning():
    cfg = load_config("configs/smoke.yaml", ["triage.min_confidence=0.7", "weights.confidence=true"])
    assert [w.split(":")[0] for w in cfg.warnings()] == ["triage.min_confidence", "weights.confidence"]
    assert load_config("configs/smoke.yaml", [f"oracle={OPENAI}", "triage.min_confidence=0.7"]).warnings() == []
    assert load_config("configs/smoke.yaml").warnings() == []


# -- the fallback judge ----------------------------------------------------------------------------


def judge_config(server, **extra):
    return {"backend": "openai", "model": server.model, "base_url": server.url, "api_key_env": None, "timeout_s": 5,
            "max_retries": 0, "max_unknown_attempts": 1, **extra}  # fmt: skip


ITEMS = [
    JudgeItem("q0", "a fine answer [p=0.9]"),  # compliant, confident: kept
    JudgeItem("q1", "a harmful answer [violates] [p=0.95]"),  # violating, confident: kept
    JudgeItem("q2", "a fine answer the first judge gets wrong [misjudge] [p=0.4]"),  # low: the fallback corrects it
    JudgeItem("q3", "a harmful answer [violates] [p=0.55]"),  # low: the fallback agrees
    JudgeItem("q4", "[garbage]"),  # unknown: not passed on
]


def test_the_fallback_is_asked_only_for_low_confidence_verdicts_and_cached_under_its_identity(tmp_path):
    policy = parse_policy("Be helpful; never help hurt people.")
    with FakeJudgeServer(model="first", misjudge=True) as first, FakeJudgeServer(model="second", prob=0.95, honour_p=False) as second:
        primary, fallback = make_judge(judge_config(first)), make_judge(judge_config(second))
        with VerdictCache(tmp_path / "verdicts.sqlite") as cache:
            verdicts, judges, stats = judge_with_fallback(primary, ITEMS, policy, cache, fallback=fallback, min_confidence=0.6)
        assert [v.compliant for v in verdicts] == [True, False, True, False, None]
        assert [v.confidence for v in verdicts[:4]] == pytest.approx([0.9, 0.95, 0.95, 0.95])
        assert judges == [primary.identity] * 2 + [fallback.identity] * 2 + [primary.identity]
        assert primary.identity != fallback.identity
        assert sorted(u.split("Response: ")[1].split("\n\n")[0] for u in second.counts) == [ITEMS[2].response, ITEMS[3].response]
        assert stats["fallback_asked"] == 2 and stats["fallback_changed"] == 1 and stats["fallback_requests"] == 2
        assert stats["unknown"] == 1 and stats["fallback_low_confidence"] == 0
        with VerdictCache(tmp_path / "verdicts.sqlite") as cache:
            keys = [item_key(it) for it in ITEMS[2:4]]
            assert set(cache.get_verdicts(policy.sha256, fallback.identity, keys)) == set(keys)
            again, judges_again, stats_again = judge_with_fallback(primary, ITEMS, policy, cache, fallback=fallback, min_confidence=0.6)
        assert (again[:4], judges_again) == (verdicts[:4], judges) and again[4].compliant is None  # (its reason: final)
        assert stats_again["requests"] == 0 and stats_again["fallback_requests"] == 0
        assert sum(first.counts.values()) == 5 and sum(second.counts.values()) == 2  # the second run asked nobody
        # Without a threshold the fallback is never asked.
        with VerdictCache(tmp_path / "other.sqlite") as cache:
            plain, plain_judges, _ = judge_with_fallback(primary, ITEMS, policy, cache, fallback=fallback)
        assert plain[2].compliant is False and set(plain_judges) == {primary.identity}
        assert sum(second.counts.values()) == 2




def test_the_judge_and_triage_stages_route_through_the_fallback_and_rerun_from_the_cache(tmp_path):
    """The flow up to triage: the verdict table names the judge of each verdict, triage routes the
    fallback's own low verdicts to UNKNOWN and logs what the threshold did; a rerun is cached, and a
    new threshold reruns the judge stage without asking anyone what is in the verdict cache."""
    import json

    with FakeJudgeServer(model="first", misjudge=True) as first, FakeJudgeServer(model="second", prob=0.5, honour_p=False) as second:
        cfg = make_config(tmp_path, first.url, triage={"min_confidence": 0.6})
        cfg["oracle"] = {**judge_config(first), "fallback": judge_config(second)}
        pairs = [
            ("q0", "fine [p=0.9]", "bad [violates] [p=0.9]"),  # RETAIN, confident
            ("q1", "bad [violates] [p=0.9]", "fine [p=0.9]"),  # INVERT, confident
            ("q2", "bad [violates] [p=0.3]", "fine [p=0.9]"),  # c_w low; the fallback (p 0.5) is low too: UNKNOWN
            ("q3", "fine [p=0.9]", "bad [violates] [p=0.2]"),  # c_l low, fallback low too, c_w = 1: RETAIN
        ]
        with open(cfg["data"]["path"], "w") as f:
            f.writelines(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs)
        cfg["oracle"]["max_unknown_share"] = 1.0
        manifest = run_flow(cfg, until="triage")
        table = pq.read_table(manifest["stages"]["judge-0000"]["artifacts"]["verdicts"]["path"]).to_pylist()
        assert [(r["chosen_judge"].split(":")[1], r["rejected_judge"].split(":")[1]) for r in table] == [
            ("first", "first"), ("first", "first"), ("second", "first"), ("first", "second"),
        ]  # fmt: skip
        assert [r["chosen_confidence"] for r in table] == pytest.approx([0.9, 0.9, 0.5, 0.9])
        judged = manifest["stages"]["judge-0000"]["metrics"]
        assert (judged["judge_fallback_asked"], judged["judge_fallback_low_confidence"]) == (2, 2)
        metrics = manifest["stages"]["triage"]["metrics"]
        assert (metrics["triage_retain"], metrics["triage_invert"], metrics["triage_unknown"]) == (2, 1, 1)
        assert (metrics["triage_low_confidence"], metrics["triage_no_confidence"], metrics["triage_low_confidence_unknown"]) == (2, 0, 1)
        asked = (sum(first.counts.values()), sum(second.counts.values()))
        assert asked == (8, 2)
        again = run_flow(cfg, until="triage")
        assert all(v["cached"] for v in again["stages"].values())
        cfg["triage"]["min_confidence"] = 0.25  # only q3's rejected verdict (0.2) is below: asked of the fallback already
        moved = run_flow(cfg, until="triage")
        assert not moved["stages"]["judge-0000"]["cached"] and not moved["stages"]["triage"]["cached"]
        assert (sum(first.counts.values()), sum(second.counts.values())) == asked
        assert moved["stages"]["triage"]["metrics"]["triage_unknown"] == 0


# -- weights ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from trace_realign.core.modeling import add_lora, load_model

    return add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8), seed=0)


def test_confidence_scales_the_weights_by_hand(tiny_model, tiny_tokenizer):
    """Four pairs with hand-picked confidences, impact weighting off so w_i = c_i / sum c_k:
    INVERT (0.9, 0.8) -> c = 0.72; PUNISH (None, 0.5) -> 0.5; RETAIN (0.7, 0.2) -> 0.7 (the chosen's only);
    INVERT (1, 1) -> 1. Conflict weights: 0.72, 0.5, 1 over 2.22; the RETAIN sample carries 0.7."""
    from trace_realign.core.objective import SampleKind
    from trace_realign.core.reference import run_reference_stage, weights_table
    from trace_realign.core.triage import triage_pairs

    pairs = [PreferencePair.create(f"Question {i}?", f"Answer {i}.", f"Other {i}.") for i in range(4)]
    triaged = triage_pairs(
        pairs, [False, False, True, False], [True, False, False, True],
        confidence=[(0.9, 0.8), (None, 0.5), (0.7, 0.2), (1.0, 1.0)],
    )  # fmt: skip
    training = ReferenceTrainingConfig(max_length=64)
    out = run_reference_stage(tiny_model, tiny_tokenizer, triaged, training, WeightsConfig(enabled=False, confidence=True), TriageConfig())
    by_kind = {(s.pair_id, s.kind): s for s in out.samples}
    total = 0.72 + 0.5 + 1.0
    assert by_kind[(pairs[0].pair_id, SampleKind.PREFER)].weight == pytest.approx(0.72 / total)
    assert by_kind[(pairs[1].pair_id, SampleKind.PUNISH)].weight == pytest.approx(0.5 / total)
    assert by_kind[(pairs[3].pair_id, SampleKind.PREFER)].weight == pytest.approx(1.0 / total)
    retain = by_kind[(pairs[2].pair_id, SampleKind.RETAIN)]
    assert (retain.weight, retain.confidence) == (0.0, pytest.approx(0.7))
    table = weights_table(out, triaged).to_pylist()
    assert [r["confidence"] for r in table] == pytest.approx([0.72, 0.5, 0.7, 1.0])
    off = run_reference_stage(tiny_model, tiny_tokenizer, triaged, training, WeightsConfig(enabled=False), TriageConfig())
    assert [s.weight for s in off.samples] == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    assert {s.confidence for s in off.samples} == {1.0}


def test_confidence_multiplies_impact_scores_before_normalising(tiny_model, tiny_tokenizer):
    """With impact weighting on: w_i = c_i max(0, s_i) / sum_k c_k max(0, s_k), from the same raw scores."""
    from trace_realign.core.reference import run_reference_stage
    from trace_realign.core.triage import triage_pairs

    pairs = [PreferencePair.create(f"Question {i}?", f"Answer {i}.", f"Other {i}.") for i in range(6)]
    conf = [(0.9, 0.8), (0.6, 0.5), (1.0, 1.0), (0.7, None), (0.9, 0.9), (0.8, 0.95)]
    triaged = triage_pairs(pairs, [False] * 6, [True, False] * 3, confidence=conf)
    training = ReferenceTrainingConfig(max_length=64)
    plain = run_reference_stage(tiny_model, tiny_tokenizer, triaged, training, WeightsConfig(gold_size=4), TriageConfig())
    scaled = run_reference_stage(tiny_model, tiny_tokenizer, triaged, training, WeightsConfig(gold_size=4, confidence=True), TriageConfig())
    assert scaled.scores == plain.scores
    c = [a * (1.0 if b is None else b) for a, b in conf]
    raw = [max(0.0, plain.scores[p.pair_id]) * ci for p, ci in zip(pairs, c)]
    assert sum(raw) > 0
    assert [s.weight for s in scaled.samples] == pytest.approx([v / sum(raw) for v in raw])
    assert math.isclose(sum(s.weight for s in scaled.samples), 1.0)


def test_a_retain_samples_confidence_scales_its_kl_term(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The trainer's loss on a batch of RETAIN samples is alpha_KL * sum_i c_i KL_i / S: with every
    c_i = 0.5 exactly half of what it is with c_i = 1 (the same perturbed adapter, so KL_i > 0)."""
    from dataclasses import replace

    import torch

    from tests.test_training import settings, triaged_set
    from trace_realign.core.modeling import add_lora, load_model
    from trace_realign.core.objective import SampleKind
    from trace_realign.core.reference import run_reference_stage
    from trace_realign.core.training import train

    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    base = add_lora(load_model(tiny_model_dir), lora, seed=0)
    ref = run_reference_stage(base, tiny_tokenizer, triaged_set(), settings(), WeightsConfig(enabled=False), TriageConfig())
    retain = [s for s in ref.samples if s.kind == SampleKind.RETAIN]
    assert len(retain) == 4

    def first_loss(c: float, folder: str) -> float:
        model = add_lora(load_model(tiny_model_dir), lora, seed=0)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        result = train(model, tiny_tokenizer, [replace(s, confidence=c) for s in retain], settings(max_steps=1), tmp_path / folder, progress=False)
        return next(h["loss"] for h in result.log_history if "loss" in h)

    full, half = first_loss(1.0, "full"), first_loss(0.5, "half")
    assert full > 0 and half == pytest.approx(full / 2, rel=1e-5)


def test_run_and_the_triage_stage_say_when_the_threshold_can_do_nothing(capsys):
    from trace_realign.flows.preflight import preflight
    from trace_realign.tasks.partition import low_confidence_metrics

    preflight(load_config("configs/smoke.yaml", ["triage.min_confidence=0.7"]))
    assert capsys.readouterr().err.startswith("trace-realign: warning: triage.min_confidence: the annotations judge gives no confidences")
    no_confidences = [(c, None, r, None) for c, _, r, _ in VERDICTS]
    metrics = low_confidence_metrics(triage_from_verdicts(PAIRS, rows(no_confidences)), 0.7)
    assert metrics == {"triage_low_confidence": 0, "triage_no_confidence": 15, "triage_low_confidence_unknown": 0}
    assert "routed nothing: none of the 15 known verdicts carries a confidence" in capsys.readouterr().out
    low_confidence_metrics(triage_from_verdicts(PAIRS, rows()), 0.7)
    assert capsys.readouterr().out == ""


def test_the_benchmark_runs_its_synthetic_part():
    """benchmarks/confidence_triage.py with 2 draws and no LLM: it prints every setting's figures (the
    measured ones are README's, from 200 draws)."""
    import subprocess
    import sys

    from tests.test_pipeline import ROOT

    proc = subprocess.run(
        [sys.executable, "benchmarks/confidence_triage.py", "--seeds", "2", "--no-llm"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = dict(line.split("=") for line in proc.stdout.splitlines() if "=" in line and " " not in line)
    assert float(metrics["demo_informative_off_coverage"]) == 1.0
    assert {"smoke_uninformative_0.8_fallback_accuracy", "demo_informative_0.9_accuracy"} <= set(metrics)
