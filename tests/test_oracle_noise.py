"""Oracle noise (triage.noise): which verdicts it corrupts and how, that it is seeded and exact,
that the verdict table and the gold labels never change, and that the smoke DAG runs under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, cli
from trace_realign.core.config import TriageConfig
from trace_realign.core.data import PreferencePair
from trace_realign.core.oracle.verdicts import triage_from_verdicts
from trace_realign.core.triage import (
    TriageType,
    apply_oracle_noise,
    noise_stats,
    table_to_triaged,
    triage,
    triage_counts,
    triaged_to_table,
)

# 10 pairs: 4 INVERT, 2 PUNISH, 3 RETAIN, 1 UNKNOWN.
CHOSEN = [False, False, False, False, False, False, True, True, True, None]
REJECTED = [True, True, True, True, False, False, False, True, None, True]


def test_rate_zero_is_the_identity():
    noisy = apply_oracle_noise(CHOSEN, REJECTED, 0.0, "mixed", seed=3)
    assert (noisy.chosen, noisy.rejected, noisy.applied) == (CHOSEN, REJECTED, [None] * 10)


@pytest.mark.parametrize("rate, drawn", [(0.1, 1), (0.2, 2), (0.5, 4), (1.0, 9)])
def test_exactly_round_rate_times_the_known_pairs_are_drawn_and_never_an_unknown(rate, drawn):
    noisy = apply_oracle_noise(CHOSEN, REJECTED, rate, "swap", seed=0)
    assert sum(a is not None for a in noisy.applied) == drawn  # round(rate * 9): 9 pairs have a triage type
    assert noisy.applied[9] is None and (noisy.chosen[9], noisy.rejected[9]) == (None, True)


def test_same_seed_same_corruption_another_seed_another():
    runs = [apply_oracle_noise(CHOSEN, REJECTED, 0.5, "mixed", seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_swap_exchanges_exactly_the_drawn_pairs_verdicts():
    noisy = apply_oracle_noise(CHOSEN, REJECTED, 0.5, "swap", seed=1)
    for i, applied in enumerate(noisy.applied):
        expected = (REJECTED[i], CHOSEN[i]) if applied == "swap" else (CHOSEN[i], REJECTED[i])
        assert (noisy.chosen[i], noisy.rejected[i]) == expected
    assert set(noisy.applied) == {"swap", None}


def test_swap_moves_invert_to_retain_and_retain_with_a_violating_loser_to_invert():
    everything = apply_oracle_noise(CHOSEN, REJECTED, 1.0, "swap", seed=0)
    assert triage(everything.chosen, everything.rejected) == [
        *[TriageType.RETAIN] * 4,  # INVERT (0, 1) -> (1, 0)
        *[TriageType.PUNISH] * 2,  # (0, 0) stays
        TriageType.INVERT,  # RETAIN (1, 0) -> (0, 1)
        TriageType.RETAIN,  # (1, 1) stays
        TriageType.UNKNOWN,  # (1, None) -> (None, 1)
        TriageType.UNKNOWN,  # never drawn
    ]


def test_flip_moves_every_drawn_pair_to_another_triage_type_and_leaves_the_rest():
    before = triage(CHOSEN, REJECTED)
    noisy = apply_oracle_noise(CHOSEN, REJECTED, 1.0, "flip", seed=5)
    after = triage(noisy.chosen, noisy.rejected)
    assert all(a is not b for a, b in zip(after[:9], before[:9]))
    assert after[9] is TriageType.UNKNOWN
    # RETAIN keeps the loser's verdict; INVERT and PUNISH set both verdicts.
    for i, t in enumerate(after[:9]):
        if t is TriageType.RETAIN:
            assert (noisy.chosen[i], noisy.rejected[i]) == (True, REJECTED[i])
        else:
            assert (noisy.chosen[i], noisy.rejected[i]) == ((False, True) if t is TriageType.INVERT else (False, False))
    half = apply_oracle_noise(CHOSEN, REJECTED, 0.5, "flip", seed=5)
    moved = [i for i, a in enumerate(half.applied) if a == "flip"]
    assert len(moved) == 4
    assert [i for i, (a, b) in enumerate(zip(triage(half.chosen, half.rejected), before)) if a is not b] == moved


def test_mixed_uses_both_modes_and_bad_settings_raise():
    noisy = apply_oracle_noise(CHOSEN * 10, REJECTED * 10, 1.0, "mixed", seed=0)
    assert {"flip", "swap"} <= set(noisy.applied)
    with pytest.raises(ValueError, match="noise rate must be in"):
        apply_oracle_noise(CHOSEN, REJECTED, 1.5)
    with pytest.raises(ValueError, match="unknown noise mode 'scramble'"):
        apply_oracle_noise(CHOSEN, REJECTED, 0.1, "scramble")


def test_triage_with_noise_keeps_gold_labels_and_counts_what_moved():
    pairs = [PreferencePair.create(f"q{i}", f"w{i}", f"l{i}") for i in range(10)]
    rows = [{"pair_id": p.pair_id, "chosen_compliant": c, "rejected_compliant": r} for p, c, r in zip(pairs, CHOSEN, REJECTED)]
    gold = [(i % 2 == 0, True) for i in range(10)]
    clean = triage_from_verdicts(pairs, rows, gold=gold)
    noisy = triage_from_verdicts(pairs, rows, gold=gold, noise=(1.0, "swap", 0))
    assert [(t.gold_chosen_compliant, t.gold_rejected_compliant) for t in noisy] == gold
    assert [(t.chosen_compliant, t.rejected_compliant) for t in clean] == list(zip(CHOSEN, REJECTED))  # rows untouched
    assert triage_counts(t.type for t in clean) == {"invert": 4, "punish": 2, "retain": 3, "unknown": 1, "total": 10}
    assert triage_counts(t.type for t in noisy) == {"invert": 1, "punish": 2, "retain": 5, "unknown": 2, "total": 10}
    # 9 drawn; the two PUNISH (0, 0) and the RETAIN (1, 1) pairs swap into themselves
    assert noise_stats(clean, noisy) == {"noise_pairs": 9, "noise_flip": 0, "noise_swap": 9, "noise_moved": 6}
    back = table_to_triaged(triaged_to_table(noisy))
    assert back == noisy  # the shard keeps the gold verdicts and each pair's noise


def test_noise_setting_is_validated_by_name():
    from trace_realign.flows.config import validate_config
    from trace_realign.core.errors import ConfigError

    assert TriageConfig.model_validate({"noise": {"rate": 0.1}}).noise.mode == "mixed"
    base = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "policy": {"path": "p.md"}, "oracle": {"backend": "annotations"}}
    with pytest.raises(ConfigError, match="triage.noise.mode"):
        validate_config({**base, "triage": {"noise": {"rate": 0.1, "mode": "scramble"}}})
    with pytest.raises(ConfigError, match="triage.noise.rate"):
        validate_config({**base, "triage": {"noise": {"rate": 2}}})


def test_smoke_dag_runs_under_noise_and_gold_dpo_trains_on_the_annotations(tmp_path):
    work = tmp_path / "work"
    proc = cli(
        ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--no-progress", "--set", f"run.workdir={work}",
         "--set", "triage.noise={rate: 0.2, mode: mixed, seed: 1}", "--set", "training.method=gold_dpo",
         "--set", "training.max_steps=2", "--set", "evaluation.max_prompts=3"],
        ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    triage_metrics = manifest["stages"]["triage"]["metrics"]
    # Every smoke pair has known verdicts (so noise cannot make one unknown): round(0.2 * all) are drawn.
    assert triage_metrics["triage_unknown"] == 0
    assert triage_metrics["noise_rate"] == 0.2
    assert triage_metrics["noise_pairs"] == round(0.2 * triage_metrics["triage_total"])
    assert triage_metrics["noise_pairs"] == triage_metrics["noise_flip"] + triage_metrics["noise_swap"]
    assert 0 < triage_metrics["noise_moved"] <= triage_metrics["noise_pairs"]
    # The smoke oracle is the annotations judge: the gold labels are its clean verdicts.
    assert triage_metrics["gold_invert"] + triage_metrics["gold_retain"] > 0
    assert manifest["stages"]["train"]["metrics"]["global_step"] == 2
    assert manifest["stages"]["reference"]["metrics"]["conflict_samples"] == (
        triage_metrics["gold_invert"] + triage_metrics["gold_retain"]
    )
