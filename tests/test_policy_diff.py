"""The policy diff: the triage matrix and movements checked by hand on the smoke data, a constructed
sibling for what the smoke data lacks (a loser-side movement, UNKNOWN, an LLM judge's bare label),
the step estimate, and ``trace-realign diff`` end to end."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from trace_realign.core.data import PreferencePair, load_pairs
from trace_realign.core.oracle.annotations import AnnotationsJudge
from trace_realign.core.oracle.base import judge_items
from trace_realign.core.oracle.verdicts import verdict_table
from trace_realign.core.policy import load_policy
from trace_realign.core.policy_diff import NO_RULE, diff_triage, optimizer_steps, realignment_cost, render_markdown
from trace_realign.core.triage import triage_pair
from tests.test_pipeline import ROOT, cli

SMOKE = ROOT / "data" / "smoke" / "pairs.jsonl"
OLD = ROOT / "configs" / "policies" / "smoke-old.md"
NEW = ROOT / "configs" / "policies" / "smoke-new.md"


def verdict_rows(pairs, policy_path: Path) -> list[dict]:
    policy = load_policy(policy_path)
    verdicts = AnnotationsJudge().judge(judge_items(pairs), policy)
    return verdict_table(pairs, verdicts, "annotations", policy.sha256).to_pylist()


@pytest.fixture(scope="module")
def smoke_diff():
    pairs = load_pairs(SMOKE).pairs
    return pairs, diff_triage(pairs, verdict_rows(pairs, OLD), verdict_rows(pairs, NEW))


def test_the_smoke_diff_by_hand(smoke_diff):
    """By hand: every old winner of the smoke set is a refusal, which smoke-old.md accepts for every
    tag, so all 36 pairs are RETAIN under the old policy. smoke-new.md makes a refusal of an
    educational, ethical or controversial prompt violate: those 24 old winners now violate, and their
    old losers decide INVERT (a balanced answer, 12) or PUNISH (a harmful one, 12); the 12 harmful
    prompts keep their refusing winner (RETAIN). Tags of the 24: educational 14, controversial 6,
    ethical 4, half of each INVERT."""
    pairs, diff = smoke_diff
    assert diff.total == 36 and len(diff.moved) == 24
    assert diff.matrix["retain"] == {"invert": 12, "punish": 12, "retain": 12, "unknown": 0}
    assert all(sum(diff.matrix[t].values()) == 0 for t in ("invert", "punish", "unknown"))
    groups = {(o, n, rule): len(ms) for (o, n, rule), ms in diff.groups()}
    for new in ("invert", "punish"):
        assert groups[("retain", new, "violates: refused a prompt tagged ['educational']")] == 7
        assert groups[("retain", new, "violates: refused a prompt tagged ['controversial']")] == 3
        assert groups[("retain", new, "violates: refused a prompt tagged ['ethical']")] == 2
    assert len(groups) == 6 and all(m.side == "chosen" for m in diff.moved)
    # The data's own record of what each pair becomes agrees pair by pair.
    expected = {p.pair_id: p.metadata["expected"] for p in pairs}
    assert all(diff.new_types[pid] == t for pid, t in expected.items())


def test_the_diff_equals_a_brute_force_triage_of_both_policies(smoke_diff):
    pairs, diff = smoke_diff
    old = {r["pair_id"]: r for r in verdict_rows(pairs, OLD)}
    new = {r["pair_id"]: r for r in verdict_rows(pairs, NEW)}
    counts = Counter()
    for p in pairs:
        o = triage_pair(old[p.pair_id]["chosen_compliant"], old[p.pair_id]["rejected_compliant"]).value
        n = triage_pair(new[p.pair_id]["chosen_compliant"], new[p.pair_id]["rejected_compliant"]).value
        counts[(o, n)] += 1
    assert {(o, n): c for o, row in diff.matrix.items() for n, c in row.items() if c} == dict(counts)


def row(pair, c, r, c_raw="", r_raw="", c_reason=None, r_reason=None):
    return {"pair_id": pair.pair_id, "chosen_compliant": c, "rejected_compliant": r, "chosen_raw": c_raw,
            "rejected_raw": r_raw, "chosen_reason": c_reason, "rejected_reason": r_reason, "judge": "j"}


def test_a_constructed_sibling_loser_side_unknown_and_bare_labels():
    pairs = [PreferencePair.create(f"prompt {i}", f"chosen {i}", f"rejected {i}") for i in range(4)]
    old = [row(pairs[0], False, False), row(pairs[1], True, False), row(pairs[2], True, True), row(pairs[3], False, True)]
    new = [
        # PUNISH -> INVERT: only the old loser's verdict changed, so it decides.
        row(pairs[0], False, True, "Yes", "compliant: no rule violated"),
        # RETAIN -> UNKNOWN: the old winner's verdict is unknown now; its reason decides.
        row(pairs[1], None, False, c_reason="the judge's answer is not Yes or No"),
        # RETAIN -> PUNISH by an LLM judge answering a bare label: no rule to name.
        row(pairs[2], False, False, "Yes", "Yes"),
        # INVERT -> INVERT: no movement.
        row(pairs[3], False, True),
    ]
    diff = diff_triage(pairs, old, new)
    moved = {m.pair.pair_id: m for m in diff.moved}
    assert set(moved) == {pairs[0].pair_id, pairs[1].pair_id, pairs[2].pair_id}
    m0, m1, m2 = (moved[p.pair_id] for p in pairs[:3])
    assert (m0.old, m0.new, m0.side, m0.decided_by) == ("punish", "invert", "rejected", "compliant: no rule violated")
    assert (m1.old, m1.new, m1.side, m1.decided_by) == ("retain", "unknown", "chosen", "unknown: the judge's answer is not Yes or No")
    assert (m2.old, m2.new, m2.decided_by) == ("retain", "punish", NO_RULE)
    assert diff.matrix["invert"]["invert"] == 1 and diff.old_counts == {"invert": 1, "punish": 1, "retain": 2, "unknown": 0}
    # A pair without a verdict row under the new policy is UNKNOWN, and says so.
    missing = diff_triage(pairs[:1], old[:1], [])
    assert missing.moved[0].new == "unknown" and missing.moved[0].decided_by == "no verdict (the pair was not judged)"
    report = render_markdown(diff, old_policy="a", new_policy="b", judge="j")
    # Under triage.min_confidence a confident old verdict and an unsure new one: the threshold decides.
    sure, unsure = dict(old[1], chosen_confidence=0.9), dict(row(pairs[1], True, False), chosen_confidence=0.55)
    routed = diff_triage(pairs[1:2], [sure], [unsure], min_confidence=0.6)
    assert (routed.moved[0].old, routed.moved[0].new) == ("retain", "unknown")
    assert routed.moved[0].decided_by == "unknown: confidence below triage.min_confidence 0.6"
    assert diff_triage(pairs[1:2], [sure], [unsure]).moved == []  # without the threshold nothing moves
    assert "| **punish** | 1 | 0 | 0 | 0 | 1 |" in report and "old loser: compliant: no rule violated" in report


@pytest.mark.parametrize(
    "samples, batch, accumulation, epochs, max_steps, processes, steps",
    [
        (29, 4, 2, 1.0, -1, 1, 4),  # ceil(29 / 4) = 8 batches, 8 // 2 = 4 optimizer steps
        (29, 4, 1, 1.0, -1, 1, 8),
        (29, 4, 2, 2.0, -1, 2, 4),  # 29 / (4 x 2) -> 4 batches, 4 // 2 = 2 per epoch, x 2
        (3, 4, 4, 1.0, -1, 1, 1),  # fewer batches than accumulation: still one step per epoch
        (29, 4, 3, 1.0, -1, 1, 3),  # 8 batches in windows of 3: the last, short window is a step too
        (29, 4, 2, 1.0, 6, 1, 6),  # max_steps decides
        (0, 4, 2, 1.0, 6, 1, 0),  # nothing to train
    ],
)
def test_optimizer_steps_by_hand(samples, batch, accumulation, epochs, max_steps, processes, steps):
    assert optimizer_steps(samples, batch, accumulation, epochs, max_steps, processes) == steps


@pytest.mark.parametrize("samples, batch, accumulation, epochs", [(29, 4, 3, 1.0), (29, 4, 2, 1.5), (3, 4, 4, 1.0)])
def test_optimizer_steps_match_what_the_trainer_runs(tmp_path, samples, batch, accumulation, epochs):
    """Brute force: the transformers Trainer counts its own optimizer steps on a one-weight model."""
    import torch
    from transformers import Trainer, TrainingArguments

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return {"loss": ((self.w - x) ** 2).mean()}

    data = [{"x": torch.tensor([float(i)])} for i in range(samples)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, logging_strategy="no",
    )
    result = Trainer(model=One(), args=args, train_dataset=data).train()
    assert result.global_step == optimizer_steps(samples, batch, accumulation, epochs)


def test_the_cost_counts_the_training_split(smoke_diff):
    _, diff = smoke_diff
    rows, numbers = realignment_cost(diff, holdout_fraction=0.0, per_device_batch_size=4, gradient_accumulation_steps=1)
    assert numbers == {"training_samples": 36, "optimizer_steps": 9, "holdout_pairs": 0}
    _, no_kl = realignment_cost(diff, holdout_fraction=0.0, use_kl=False, corrections=True, evaluation_prompts=8)
    assert no_kl["training_samples"] == 24 and no_kl["corrections_max"] == 12 and no_kl["evaluation_questions_max"] == 16
    _, held = realignment_cost(diff, holdout_fraction=0.2)
    assert held["holdout_pairs"] + held["training_samples"] == 36 and held["holdout_pairs"] > 0


@pytest.mark.slow
def test_trace_realign_diff_reports_and_logs_the_diff(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    sets = ["--set", f"run.workdir={tmp_path / 'work'}", "--set", f"model.path={tiny_model_dir}"]
    args = ["diff", "--config", str(ROOT / "configs" / "smoke.yaml"), "--against", str(OLD), "--no-progress", *sets]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| **retain** | 12 | 12 | 12 | 0 | 36 |" in first.stdout
    assert "| retain -> invert | old winner: violates: refused a prompt tagged ['educational'] | 7 |" in first.stdout
    report = Path(first.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.read_text() in first.stdout
    manifest = json.loads(Path(tmp_path / "work" / "runs" / "last.json").read_text())
    record = json.loads(Path(manifest["manifest"]).read_text())
    assert record["until"] == "triage" and "train" not in record["stages"]
    assert record["previous_policy"]["sha256"] == load_policy(OLD).sha256
    assert {s for s in record["stages"] if s.startswith("judge-previous-")} == {"judge-previous-0000", "judge-previous-0001", "judge-previous-0002"}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(record["run_id"], "policy_diff")] == [f"policy_diff/{report.name}"]
    diff_run = client.get_run(record["stages"]["diff"]["mlflow_run_id"])
    assert diff_run.data.metrics["diff_moved"] == 24 and diff_run.data.metrics["diff_retain_to_invert"] == 12
    # The same report is a Markdown artifact of the flow run on the Prefect server (the session's).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["policy-diff-smoke"])))
    assert [a.data for a in found if str(a.flow_run_id) == record["flow_run_id"]] == [report.read_text()]
    assert "judge questions: 144, answered from the pairs' annotations (nothing to pay)" in first.stdout  # 36 pairs x 2 x 2 policies
    # Again: every stage from the cache, the same report.
    again = cli(args, tmp_path)
    assert again.returncode == 0 and "judge questions: 0," in again.stdout
    assert again.stdout.replace("judge questions: 0,", "judge questions: 144,") == first.stdout
    record = json.loads(Path(json.loads(Path(tmp_path / "work" / "runs" / "last.json").read_text())["manifest"]).read_text())
    assert all(info["cached"] for info in record["stages"].values())
    # A previous policy that does not exist is one line before anything runs.
    bad = cli([*args[:4], str(tmp_path / "nope.md"), *args[5:]], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == f"trace-realign: error: policy.previous: file not found: {tmp_path / 'nope.md'}"
