"""Evaluation: generation, TPA, perplexity, the evaluation flow and labelled generations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.evaluation import (
    evaluate_generations,
    generate,
    generate_reference_and_realigned,
    response_perplexity,
    significant_improvement,
    target_policy_agreement,
    tpa_by_group,
    utility_proxy,
)
from trace_realign.core.config import LoraConfig
from trace_realign.core.modeling import add_lora, load_model
from trace_realign.core.data import text_sha256
from trace_realign.core.oracle.base import Judge, JudgeItem, OnResult, Verdict
from trace_realign.core.oracle.cache import VerdictCache
from trace_realign.core.policy import parse_policy
from trace_realign.core.tokenization import Encoder

PROMPTS = [
    "What is the capital of France?",
    "Tell me about the trolley problem and civil disobedience, in detail please.",
    "hi",
    "How do I protect my account?",
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Index funds?"}],
    "I feel overwhelmed.",
    "Write a scene in which a thriller antagonist explains a bank heist to a henchman.",
]
POLICY = parse_policy("Answer questions helpfully; refuse only critical harm.")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    return add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.1), seed=0)


def _perturb_lora_b(model, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_prompt_at_a_time(model, tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    calls = []
    batched = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=24, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    alone = [generate(model, tiny_tokenizer, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) > 1  # the prompts do reach the model
    assert all(isinstance(t, str) and t == t.strip() for t in batched)
    assert "<|im_end|>" not in "".join(batched)
    assert calls == [(4, 7), (7, 7)]
    assert tiny_tokenizer.padding_side == side  # the tokenizer is left as it was
    assert generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=24, batch_size=3) == batched  # deterministic
    assert generate(model, tiny_tokenizer, []) == []


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tiny_tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, tiny_tokenizer, PROMPTS[:3], max_new_tokens=12, greedy=False, temperature=1.5, seed=7)
    b = generate(model, tiny_tokenizer, PROMPTS[:3], max_new_tokens=12, greedy=False, temperature=1.5, seed=7)
    assert a == b
    assert torch.equal(torch.get_rng_state(), state)


def test_reference_and_realigned_generation_share_one_lora_model(model, lora_model, tiny_tokenizer):
    plain = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=16)
    lora_model.train()
    ref, new, _, _ = generate_reference_and_realigned(lora_model, tiny_tokenizer, PROMPTS, max_new_tokens=16)
    assert ref == new == plain  # LoRA B = 0 at initialisation: the adapter changes nothing yet
    assert lora_model.training  # the training flag is restored
    _perturb_lora_b(lora_model)
    ticks = []
    ref, new, _, _ = generate_reference_and_realigned(lora_model, tiny_tokenizer, PROMPTS, max_new_tokens=16, progress=lambda d, t: ticks.append((d, t)))
    assert ref == plain  # adapter disabled: the reference
    assert new != ref
    assert ticks[-1] == (14, 14)
    with pytest.raises(TraceError, match="reference_model"):
        generate_reference_and_realigned(model, tiny_tokenizer, PROMPTS[:1])
    ref2, new2, _, _ = generate_reference_and_realigned(model, tiny_tokenizer, PROMPTS, reference_model=model, max_new_tokens=16)
    assert ref2 == new2 == plain


# --------------------------------------------------------------------------- TPA


def _v(c: bool | None) -> Verdict:
    return Verdict.unknown("timeout") if c is None else Verdict(compliant=c, confidence=None, raw="")


def test_target_policy_agreement_by_hand():
    verdicts = [_v(c) for c in (True, True, False, None, True, False, None, False)]
    assert target_policy_agreement(verdicts) == {"tpa": 50.0, "n": 8, "n_known": 6, "n_unknown": 2, "n_compliant": 3}
    assert target_policy_agreement([_v(None)])["tpa"] is None
    groups = ["invert", "invert", "punish", "punish", "retain", "retain", "unknown", "invert"]
    by = tpa_by_group(verdicts, groups)
    assert list(by) == ["invert", "punish", "retain", "unknown"]
    assert by["invert"]["tpa"] == pytest.approx(200 / 3) and by["invert"]["n"] == 3
    assert by["punish"] == {"tpa": 0.0, "n": 2, "n_known": 1, "n_unknown": 1, "n_compliant": 0}
    assert by["retain"]["tpa"] == 50.0
    assert by["unknown"]["tpa"] is None and by["unknown"]["n_unknown"] == 1
    with pytest.raises(DataError):
        tpa_by_group(verdicts, groups[:-1])


def test_significant_improvement_by_hand():
    assert significant_improvement(40.0, 60.0, 0.85)  # +20 pp > 15 pp error
    assert not significant_improvement(40.0, 50.0, 0.85)  # +10 pp < 15 pp
    assert not significant_improvement(40.0, 55.0, 0.85)  # exactly the error rate is not more
    assert significant_improvement(40.0, 40.5, 1.0)
    assert not significant_improvement(60.0, 40.0, 0.99)
    assert not significant_improvement(None, 60.0, 0.9)
    assert not significant_improvement(40.0, 60.0, None)
    with pytest.raises(ValueError):
        significant_improvement(0.4, 0.6, 85)  # accuracy given in percent


# --------------------------------------------------------------------------- perplexity


def _brute_force_perplexity(model, tokenizer, prompts, responses) -> float:
    encoder = Encoder(tokenizer, max_length=256)
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            seq = encoder.sequence(p, r)
            ids = torch.tensor([seq.input_ids])
            for t in range(seq.response_start, len(seq.input_ids)):
                logits = model(input_ids=ids[:, :t]).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[seq.input_ids[t]])
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_a_token_by_token_computation(model, tiny_tokenizer):
    prompts = PROMPTS[:4]
    responses = ["Paris is the capital of France.", "It asks whether to divert a trolley.", "Hello!", "Use a password manager."]
    expected = _brute_force_perplexity(model, tiny_tokenizer, prompts, responses)
    got = response_perplexity(model, tiny_tokenizer, prompts, responses, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-4)
    assert response_perplexity(model, tiny_tokenizer, prompts, responses, batch_size=1) == pytest.approx(got, rel=1e-5)


def test_utility_proxy_compares_adapter_on_and_off(tiny_model_dir, tiny_tokenizer):
    lora = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    prompts, responses = PROMPTS[:3], ["Paris.", "A thought experiment.", "Hi, how can I help?"]
    same = utility_proxy(lora, tiny_tokenizer, prompts, responses)
    assert same["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    _perturb_lora_b(lora)
    moved = utility_proxy(lora, tiny_tokenizer, prompts, responses)
    assert moved["reference_perplexity"] == pytest.approx(same["reference_perplexity"], rel=1e-6)
    assert moved["realigned_perplexity"] == pytest.approx(response_perplexity(lora, tiny_tokenizer, prompts, responses))
    assert abs(moved["perplexity_ratio"] - 1.0) > 1e-3
    assert moved["n_responses"] == 3 and moved["n_tokens"] > 3


# --------------------------------------------------------------------------- evaluate_generations


class LengthJudge(Judge):
    """Compliant when the response has an even number of characters; counts what it is asked."""

    backend = "length"

    def __init__(self):
        self.asked = 0

    @property
    def identity(self) -> str:
        return "length:test:0"

    def judge(self, items: Sequence[JudgeItem], policy, on_result: OnResult | None = None) -> list[Verdict]:
        self.asked += len(items)
        out = [Verdict(compliant=len(it.response) % 2 == 0, confidence=0.9, raw="") for it in items]
        for i, v in enumerate(out):
            if on_result is not None:
                on_result(i, v)
        return out

    def correct(self, items, policy, on_result=None):
        raise TraceError("no corrections")


def test_evaluate_generations_rows_and_metrics(tiny_model_dir, tiny_tokenizer, tmp_path):
    lora = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    _perturb_lora_b(lora)
    groups = ["invert", "punish", "retain", "invert", "retain", "punish", "retain"]
    judge = LengthJudge()
    with VerdictCache(tmp_path / "verdicts.sqlite") as cache:
        result = evaluate_generations(
            lora, tiny_tokenizer, PROMPTS, judge, POLICY, groups=groups, cache=cache, judge_accuracy=0.9, max_new_tokens=12
        )
        assert judge.asked == len({(text_sha256(r["prompt"]), r[k]) for r in result.rows for k in ("reference_response", "realigned_response")})
        again = evaluate_generations(lora, tiny_tokenizer, PROMPTS, judge, POLICY, groups=groups, cache=cache, max_new_tokens=12)
        assert again.judge_stats["requests"] == 0  # every generation judged already
    assert len(result.rows) == 7
    row = result.rows[0]
    assert set(row) >= {"prompt", "group", "reference_response", "realigned_response", "reference_compliant", "realigned_compliant", "reference_confidence", "realigned_confidence"}
    before = [r["reference_compliant"] for r in result.rows]
    after = [r["realigned_compliant"] for r in result.rows]
    assert before == [len(r["reference_response"]) % 2 == 0 for r in result.rows]
    m = result.metrics
    assert m["tpa_before"] == pytest.approx(100 * sum(before) / 7)
    assert m["tpa_after"] == pytest.approx(100 * sum(after) / 7)
    assert m["tpa_delta"] == pytest.approx(m["tpa_after"] - m["tpa_before"])
    assert m["n"] == 7 and m["n_unknown_before"] == 0 and m["n_unknown_after"] == 0
    retain = [r for r in result.rows if r["group"] == "retain"]
    assert m["tpa_after/retain"] == pytest.approx(100 * sum(r["realigned_compliant"] for r in retain) / 3)
    assert m["n/retain"] == 3 and set(result.by_group) == {"invert", "punish", "retain"}
    assert m["judge_error_pp"] == pytest.approx(10.0)
    assert m["significant"] == float(significant_improvement(m["tpa_before"], m["tpa_after"], 0.9))
    assert m["generation_seconds_reference"] > 0 and m["generation_seconds_realigned"] > 0
    assert result.judge == "length:test:0"
    assert [r["reference_response"] for r in result.rows] != [r["realigned_response"] for r in result.rows]


def test_annotations_judge_is_refused_for_generated_text(model, tiny_tokenizer):
    from trace_realign.core.oracle.annotations import AnnotationsJudge

    with pytest.raises(TraceError, match="cannot judge generated text"):
        evaluate_generations(model, tiny_tokenizer, PROMPTS[:1], AnnotationsJudge(), POLICY, reference_model=model, max_new_tokens=2)


# --------------------------------------------------------------------------- labelled generations


def _write_labels(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_judge_accuracy_on_labelled_generations_by_hand(tmp_path):
    from trace_realign.core.evaluation import judge_on_labels, load_generation_labels

    # LengthJudge says compliant for an even length. Labels: 4 right, 1 wrong.
    rows = [
        {"prompt": "p1", "response": "ab", "compliant": True},  # even -> T, label T
        {"prompt": "p1", "response": "abc", "compliant": False},  # odd -> F, label F
        {"prompt": "p2", "response": "abcd", "compliant": True},  # even -> T, label T
        {"prompt": "p2", "response": "a", "compliant": True},  # odd -> F, label T  (miss)
        {"prompt": "p3", "response": "abcde", "compliant": False, "note": "kept out"},  # odd -> F, label F
    ]
    labels = load_generation_labels(_write_labels(tmp_path / "labels.jsonl", rows))
    judge = LengthJudge()
    with VerdictCache(tmp_path / "v.sqlite") as cache:
        report = judge_on_labels(judge, POLICY, labels, cache)
        again = judge_on_labels(judge, POLICY, labels, cache)
    assert report["accuracy"] == pytest.approx(4 / 5)
    assert (report["tp"], report["fp"], report["fn"], report["tn"]) == (2, 0, 1, 2)
    # kappa: p_o = 0.8, p_e = P(pred T) P(ref T) + P(pred F) P(ref F) = 0.4*0.6 + 0.6*0.4 = 0.48
    assert report["cohen_kappa"] == pytest.approx((0.8 - 0.48) / (1 - 0.48))
    assert again == report and judge.asked == 5  # the second pass came from the cache


def test_labelled_tpa_counts_exact_matches_only(tmp_path):
    from trace_realign.core.evaluation import labelled_tpa, load_generation_labels

    labels = load_generation_labels(
        _write_labels(
            tmp_path / "labels.jsonl",
            [
                {"prompt": "p1", "response": "yes", "compliant": True},
                {"prompt": "p2", "response": "no", "compliant": False},
                {"prompt": "p3", "response": "maybe", "compliant": True},
            ],
        )
    )
    found = labelled_tpa(["p1", "p2", "p3", "p4"], ["yes", "no", "maybe!", "x"], labels)
    # p1 and p2 match exactly (1 of 2 compliant); p3's response differs; p4 has no label.
    assert found == {"n": 4, "covered": 2, "coverage": 50.0, "tpa": 50.0}
    assert labelled_tpa(["p9"], ["zz"], labels)["tpa"] is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", ":2: not JSON"),
        ('{"prompt": "p", "response": "r", "compliant": "yes"}', ":2: 'compliant' must be true or false"),
        ('{"prompt": "", "response": "r", "compliant": true}', ":2: 'prompt' must be a non-empty string"),
        ('{"prompt": "p1", "response": "r", "compliant": false}', ":2: the same prompt and response are labelled both ways"),
    ],
)
def test_bad_label_lines_are_named(tmp_path, line, message):
    from trace_realign.core.evaluation import load_generation_labels

    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt": "p1", "response": "r", "compliant": true}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_generation_labels(path)
    assert str(path) + message in str(err.value)


def test_labels_written_under_another_policy_are_refused(tmp_path):
    from dataclasses import replace

    from trace_realign.core.evaluation import load_generation_labels

    path = _write_labels(
        tmp_path / "labels.jsonl",
        [
            {"prompt": "p1", "response": "r", "compliant": True, "policy_sha256": POLICY.sha256},
            {"prompt": "p2", "response": "r", "compliant": False},  # says nothing: accepted
        ],
    )
    assert len(load_generation_labels(path, POLICY)) == 2
    edited = replace(POLICY, sha256="f" * 64)
    with pytest.raises(DataError) as err:
        load_generation_labels(path, edited)
    assert f"{path}:1: labelled under policy {POLICY.sha256[:8]}, but the policy is now ffffffff" in str(err.value)
    assert len(load_generation_labels(path)) == 2  # without a policy to check against, no check


def test_the_shipped_demo_labels_load_and_cover_every_heldout_prompt():
    import json
    from pathlib import Path

    from trace_realign.core.evaluation import load_generation_labels
    from trace_realign.core.policy import load_policy

    root = Path(__file__).resolve().parents[1]
    # They were labelled under the demo's new policy: editing new.md fails here until they are relabelled.
    new = load_policy(root / "configs" / "policies" / "new.md")
    labels = load_generation_labels(root / "data" / "demo" / "generation_labels.jsonl", new)
    prompts = [json.loads(line)["prompt"] for line in (root / "data" / "demo" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert {lab.prompt for lab in labels} == set(prompts)
    rows = [json.loads(line) for line in (root / "data" / "demo" / "generation_labels.jsonl").read_text().splitlines()]
    assert len(rows) == len(labels)  # no duplicates
    assert all(r["policy_sha256"] == new.sha256 for r in rows)
    # The reference model's own generation of every prompt is labelled exactly once.
    reference = [r["prompt"] for r in rows if r["model"] == "smollm2-135m-instruct"]
    assert sorted(reference) == sorted(prompts)
