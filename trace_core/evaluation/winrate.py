"""Win rate: which of two response lists to the same prompts a judge prefers under the policy.

Every pair is asked in both orders (response a as "A" and b as "B", then b as "A" and a as "B"),
which cancels the judge's position bias. The conservative rule of Zheng et al. (MT-Bench, arXiv
2306.05685, section 3.4) decides a pair: a WIN for a only when a is preferred in both orders, a
LOSS only when b is preferred in both, a TIE otherwise (the judge said tie, or changed its mind
when the order changed). A pair whose two responses are identical is a tie without asking. A pair
with an unknown comparison in either order has no outcome: it is counted (``n_unknown``) and left
out of the rates, as unknown verdicts are left out of TPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_realign.core.data import Prompt
from trace_realign.core.errors import DataError
from trace_realign.core.oracle.base import Comparison, ComparisonItem, Judge
from trace_realign.core.policy import Policy

_SCORE = {"A": 1, "B": -1, "tie": 0}


def pair_outcome(first: Comparison, second: Comparison) -> str | None:
    """"win", "loss" or "tie" for response a, from ``first`` (a asked as "A") and ``second`` (a asked
    as "B"); None when either comparison is unknown."""
    if first.winner is None or second.winner is None:
        return None
    a_first, a_second = _SCORE[first.winner], -_SCORE[second.winner]
    if a_first == a_second == 1:
        return "win"
    if a_first == a_second == -1:
        return "loss"
    return "tie"


@dataclass(frozen=True)
class WinRate:
    """The outcome of comparing responses a with responses b.

    win, loss, tie: pairs a won, lost, tied (:func:`pair_outcome`); n = win + loss + tie, the pairs
    with an outcome; n_unknown: pairs left out because a comparison was unknown.
    rows: one dict per prompt: prompt, response_a, response_b, first (the winner the judge named with
    a as "A"; None when not asked or unknown), second (with b as "A"), outcome, reason (why unknown).
    """

    win: int
    loss: int
    tie: int
    n: int
    n_unknown: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def _rate(self, count: int) -> float | None:
        return 100.0 * count / self.n if self.n else None

    @property
    def win_rate(self) -> float | None:
        """Percentage of pairs with an outcome that a won (None when no pair has one)."""
        return self._rate(self.win)

    @property
    def loss_rate(self) -> float | None:
        """Percentage of pairs with an outcome that a lost."""
        return self._rate(self.loss)

    @property
    def tie_rate(self) -> float | None:
        """Percentage of pairs with an outcome that tied."""
        return self._rate(self.tie)

    def metrics(self) -> dict[str, float]:
        """{win_rate, loss_rate, tie_rate (percentages, left out when n is 0), win_n, win_n_unknown}."""
        out = {"win_n": float(self.n), "win_n_unknown": float(self.n_unknown)}
        for name in ("win_rate", "loss_rate", "tie_rate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def win_rate(
    judge: Judge,
    policy: Policy,
    prompts: Sequence[Prompt],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
) -> WinRate:
    """How often ``judge`` prefers ``responses_a`` over ``responses_b`` (one each per prompt) under
    ``policy``, each differing pair asked in both orders in one :meth:`Judge.compare` call (2 x the
    differing pairs), decided by :func:`pair_outcome`.

    Raises DataError when the three lists differ in length; TraceError from a judge that cannot
    compare (:meth:`Judge.compare`) or that fails for every item.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise DataError(f"win rate: {len(prompts)} prompts, {len(responses_a)} responses a, {len(responses_b)} responses b")
    asked = [i for i in range(len(prompts)) if responses_a[i] != responses_b[i]]
    items = [ComparisonItem(prompts[i], responses_a[i], responses_b[i]) for i in asked]
    items += [ComparisonItem(prompts[i], responses_b[i], responses_a[i]) for i in asked]
    answers = judge.compare(items, policy) if items else []
    both = {i: (answers[k], answers[k + len(asked)]) for k, i in enumerate(asked)}
    counts = {"win": 0, "loss": 0, "tie": 0, None: 0}
    rows = []
    for i, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
        first, second = both.get(i, (None, None))
        outcome = "tie" if first is None else pair_outcome(first, second)
        counts[outcome] += 1
        reason = None if outcome is not None else next(c.reason for c in (first, second) if c.winner is None)
        rows.append({
            "prompt": prompt, "response_a": a, "response_b": b,
            "first": first.winner if first else None, "second": second.winner if second else None,
            "outcome": outcome, "reason": reason,
        })  # fmt: skip
    n = counts["win"] + counts["loss"] + counts["tie"]
    return WinRate(counts["win"], counts["loss"], counts["tie"], n, counts[None], rows)
