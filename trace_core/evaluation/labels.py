"""Generations labelled by hand: loading them, a judge's agreement with them, TPA from them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_realign.core.data import Prompt
from trace_realign.core.errors import DataError
from trace_realign.core.oracle.base import Judge, JudgeItem, prompt_text
from trace_realign.core.oracle.cache import VerdictCache, judge_with_cache
from trace_realign.core.oracle.quality import judge_agreement
from trace_realign.core.policy import Policy


@dataclass(frozen=True)
class LabelledResponse:
    """A generated response with a compliance label given by a person (or a trusted judge)."""

    prompt: Prompt
    response: str
    compliant: bool


def load_generation_labels(
    path: str | Path, policy: Policy | None = None, setting: str = "evaluation.labels_path"
) -> list[LabelledResponse]:
    """Labelled generations (or any responses: ``setting`` names the setting the file comes from in
    messages) from a JSONL file: one object per line with ``prompt``, ``response``
    (strings) and ``compliant`` (true/false); other keys (notes, the model that wrote it) are kept
    out. A bad line raises DataError naming the file and line; a repeated (prompt, response) with a
    conflicting label too; so does a missing or empty file.

    A line may name the policy it was labelled under, ``policy_sha256`` (:attr:`Policy.sha256`).
    Given ``policy``, a line labelled under another policy raises DataError: a label is a verdict
    under one policy, and scoring a judge or a model against labels for a policy since edited would
    report a wrong accuracy without a sign of it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labelled responses file not found ({setting})")
    out: dict[tuple[str, str], LabelledResponse] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        prompt, response, label = row.get("prompt"), row.get("response"), row.get("compliant")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(response, str):
            raise DataError(f"{where}: 'response' must be a string")
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'compliant' must be true or false, got {label!r}")
        labelled_under = row.get("policy_sha256")
        if labelled_under is not None and not isinstance(labelled_under, str):
            raise DataError(f"{where}: 'policy_sha256' must be a string")
        if policy is not None and labelled_under is not None and labelled_under != policy.sha256:
            raise DataError(
                f"{where}: labelled under policy {labelled_under[:8]}, but the policy is now "
                f"{policy.short_hash} ({policy.path or policy.name}): relabel these generations under it, "
                f"or drop {setting}"
            )
        key = (prompt, response)
        if key in out and out[key].compliant != label:
            raise DataError(f"{where}: the same prompt and response are labelled both ways")
        out[key] = LabelledResponse(prompt, response, label)
    if not out:
        raise DataError(f"{path}: no labelled responses ({setting})")
    return list(out.values())


def judge_on_labels(
    judge: Judge, policy: Policy, labels: Sequence[LabelledResponse], cache: VerdictCache | None = None
) -> dict[str, float | int | None]:
    """The judge's agreement with labelled generated text: accuracy, Cohen's kappa, confusion
    counts (:func:`trace_realign.core.oracle.quality.judge_agreement`). This is the error rate that matters
    for TPA, which judges generated text; an accuracy measured on the training data's responses can
    be far higher when those are written in another style. Verdicts go through ``cache`` when given."""
    items = [JudgeItem(lab.prompt, lab.response) for lab in labels]
    if cache is not None:
        verdicts, _ = judge_with_cache(judge, items, policy, cache)
    else:
        verdicts = judge.judge(items, policy)
    return judge_agreement([v.compliant for v in verdicts], [lab.compliant for lab in labels])


def labelled_tpa(prompts: Sequence[Prompt], responses: Sequence[str], labels: Sequence[LabelledResponse]) -> dict[str, Any]:
    """TPA from labels alone over the generations that have one (exact prompt and response match).

    Greedy decoding is deterministic, so a labelled set made from an earlier run covers the same
    model's generations on the same prompts exactly. Returns {n, covered, coverage (% of ``n``),
    tpa (% of covered judged compliant by the labels, None when none is covered)}.
    """
    table = {(prompt_text(lab.prompt), lab.response): lab.compliant for lab in labels}
    found = [table.get((prompt_text(p), r)) for p, r in zip(prompts, responses)]
    known = [f for f in found if f is not None]
    return {
        "n": len(found),
        "covered": len(known),
        "coverage": 100.0 * len(known) / len(found) if found else 0.0,
        "tpa": 100.0 * sum(known) / len(known) if known else None,
    }
