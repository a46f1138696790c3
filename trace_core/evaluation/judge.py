"""The judge of the evaluation: the configured one when it reads generated text, else a local
judge trained on the training split's verdicts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from trace_realign.core.errors import DataError
from trace_realign.core.oracle.base import Judge, JudgeItem
from trace_realign.core.oracle.factory import make_judge
from trace_realign.core.oracle.local_judges import LocalJudge, fit_local_judge
from trace_realign.core.policy import Policy
from trace_realign.core.triage import TriagedPair


def local_judge_from_verdicts(triaged: Sequence[TriagedPair], policy: Policy, *, seed: int = 0) -> LocalJudge:
    """A local judge (:func:`~trace_realign.core.oracle.local_judges.fit_local_judge`) trained on the
    responses of ``triaged`` pairs labelled by their verdicts (a response with an unknown verdict is
    left out, and so is a pair whose verdicts the oracle-noise study changed: the judge learns the
    oracle's own verdicts), with the response's ``refusal`` annotation where it has one; its held-out
    split is drawn under ``seed``. Raises DataError when the verdicts have one class only."""
    items, labels = [], []
    for t in triaged:
        if t.noise is not None:
            continue
        sides = (
            (t.pair.chosen, t.chosen_compliant, t.pair.chosen_annotations),
            (t.pair.rejected, t.rejected_compliant, t.pair.rejected_annotations),
        )
        for response, label, notes in sides:
            if label is not None:
                refusal = (notes or {}).get("refusal")
                items.append(JudgeItem(t.pair.prompt, response, {"refusal": refusal} if isinstance(refusal, bool) else None))
                labels.append(label)
    if len(set(labels)) < 2:
        raise DataError("evaluation: the training split's verdicts have one class only; the embedding judge cannot learn")
    return fit_local_judge(items, labels, policy, seed=seed)


def judge_for_generations(
    config: dict[str, Any] | BaseModel,
    policy: Policy,
    training: Callable[[], Sequence[TriagedPair]],
    *,
    seed: int = 0,
    where: str = "oracle",
    question: str = "violation",
) -> Judge:
    """The judge for a model's generations under ``policy``.

    The judge ``config`` describes (:func:`~trace_realign.core.oracle.factory.make_judge`; ``where``
    names its config section in messages; an LLM judge asks ``question``, "violation" or
    "compliance") when it reads generated text
    (:attr:`~trace_realign.core.oracle.base.Judge.reads_generated_text`). Otherwise (the annotations
    judge) a local judge trained on the training split's verdict-labelled responses
    (:func:`local_judge_from_verdicts`, ``training()`` called only then), whose
    :attr:`~trace_realign.core.oracle.base.Judge.held_out` accuracy is to be reported next to every
    TPA it gives. Raises ConfigError for a bad config, DataError when the verdicts cannot train a
    local judge.
    """
    judge = make_judge(config, where, question)
    if judge.reads_generated_text:
        return judge
    judge.close()
    return local_judge_from_verdicts(training(), policy, seed=seed)
