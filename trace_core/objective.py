"""Training samples of the TRACE objective and their per-sample losses.

Every triaged pair becomes one sample of one kind, holding one or two encoded sequences:

| kind    | sequences        | loss                                                   |
|---------|------------------|--------------------------------------------------------|
| PREFER  | (a, b)           | ``dpo_loss`` of a over b (INVERT: y_l over y_w; PUNISH with correction: y_c over y_w; gold pairs) |
| PUNISH  | (y_w, y_l)       | ``punish_loss`` (TRACE form) or ``punish_loss_npo`` (NPO paper form, 2/beta) |
| NEGATE  | (y,)             | one-sided NPO on y (the no-triage ablation: every old loser pushed down) |
| RETAIN  | (y_w,)           | ``retain_kl`` to the reference on y_w's tokens          |

``L_TRACE = sum_{conflict} w_i L_i + alpha_KL * sum_{retain} KL_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from trace_realign.core.losses import dpo_loss, npo_loss, punish_loss, punish_loss_npo, robust_dpo_loss
from trace_realign.core.tokenization import EncodedSequence

if TYPE_CHECKING:
    from trace_realign.core.tokenization import Encoder
    from trace_realign.core.triage import TriagedPair

PunishForm = Literal["trace", "npo"]
Method = Literal["trace", "naive_relabel_dpo", "robust_dpo", "npo", "gold_dpo"]


class SampleKind(IntEnum):
    PREFER = 0
    PUNISH = 1
    NEGATE = 2
    RETAIN = 3


@dataclass(frozen=True)
class Sample:
    """One training (or scoring) sample: its kind, its sequences, and the pair it comes from.
    ``confidence`` is the factor ``c_i`` of ``weights.confidence`` (1: none), already folded into a
    conflict sample's ``weight``; a RETAIN sample's KL term is multiplied by it."""

    pair_id: str
    kind: SampleKind
    sequences: tuple[EncodedSequence, ...]
    weight: float = 1.0
    ref_logps: tuple[float, float] = (0.0, 0.0)
    confidence: float = 1.0

    def __post_init__(self):
        expected = 1 if self.kind in (SampleKind.NEGATE, SampleKind.RETAIN) else 2
        if len(self.sequences) != expected:
            raise ValueError(f"{self.kind.name} sample needs {expected} sequences, got {len(self.sequences)}")


def conflict_losses(
    kinds: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    punish_form: PunishForm = "trace",
    robust_epsilon: float | None = None,
) -> torch.Tensor:
    """Per-sample losses [S] of the conflict kinds (PREFER, PUNISH, NEGATE); 0 for RETAIN.

    ``policy_logps`` and ``ref_logps`` are [S, 2]: the summed response log-probs of each sample's
    first and second sequence (the second is unused for one-sequence kinds). PREFER is DPO, or
    Robust DPO (arXiv 2403.00409) with flip rate ``robust_epsilon`` when one is given.
    """
    pa, pb = policy_logps[:, 0], policy_logps[:, 1]  # [S] each
    ra, rb = ref_logps[:, 0], ref_logps[:, 1]  # [S] each
    if robust_epsilon is None:
        prefer = dpo_loss(pa, pb, ra, rb, beta)
    else:
        prefer = robust_dpo_loss(pa, pb, ra, rb, beta, robust_epsilon)
    if punish_form == "trace":
        punish = punish_loss(pa, pb, ra, rb, beta)
        # The authors' scale: one term of the dual form, -log sigmoid(-beta r(y)), i.e. NPO without 2/beta.
        negate = npo_loss(pa, ra, beta) * (beta / 2.0)
    elif punish_form == "npo":
        punish = punish_loss_npo(pa, pb, ra, rb, beta)
        negate = npo_loss(pa, ra, beta)
    else:
        raise ValueError(f"unknown punish form '{punish_form}' (use trace or npo)")
    zero = torch.zeros_like(prefer)
    return torch.where(
        kinds == SampleKind.PREFER,
        prefer,
        torch.where(kinds == SampleKind.PUNISH, punish, torch.where(kinds == SampleKind.NEGATE, negate, zero)),
    )


def gather_pairs(row_values: torch.Tensor, row_sample: torch.Tensor, row_slot: torch.Tensor, n_samples: int):
    """Scatter per-row values [R] into a [S, 2] table by (sample, slot); missing slots are 0."""
    table = row_values.new_zeros((n_samples, 2))
    return table.index_put((row_sample, row_slot), row_values)


def flatten_sequences(samples: Sequence[Sample]):
    """All sequences of the samples, with the sample index and slot of each."""
    sequences, row_sample, row_slot = [], [], []
    for i, s in enumerate(samples):
        for j, seq in enumerate(s.sequences):
            sequences.append(seq)
            row_sample.append(i)
            row_slot.append(j)
    return sequences, torch.tensor(row_sample, dtype=torch.long), torch.tensor(row_slot, dtype=torch.long)


def build_samples(
    triaged: Sequence["TriagedPair"],
    encoder: "Encoder",
    *,
    use_triage: bool = True,
    use_kl: bool = True,
    use_corrections: bool = False,
    method: Method = "trace",
) -> list[Sample]:
    """The samples of ``method``'s objective for triaged pairs (UNKNOWN pairs are left out).

    The baselines (``use_triage``, ``use_kl`` and ``use_corrections`` do not apply to them):

    - ``naive_relabel_dpo`` and ``robust_dpo`` (arXiv 2511.02623's naive relabelling baseline, and
      Robust DPO over the same pairs): PREFER on every INVERT and RETAIN pair relabelled
      (:func:`~trace_realign.core.triage.relabelled`), PUNISH pairs dropped.
    - ``gold_dpo`` (arXiv 2511.02623's upper reference, DPO on gold labels): the same, with each pair
      triaged by its gold verdicts (:func:`~trace_realign.core.triage.gold_view`) instead of the
      oracle's: gold INVERT swapped, gold RETAIN as is, gold PUNISH and pairs without gold labels
      dropped. Oracle noise never reaches it.
    - ``npo`` (arXiv 2404.05868): NEGATE on every response the oracle judged violating.

    TRACE (arXiv 2511.02623, stage 1 and 2):

    - INVERT: PREFER (y_l over y_w).
    - PUNISH: PUNISH (y_w, y_l); with ``use_corrections`` and a correction y_c: PREFER (y_c over y_w).
    - RETAIN: RETAIN (y_w), unless ``use_kl`` is off.
    - ``use_triage=False`` (the no-triage ablation as the authors' code runs it, arXiv 2511.02623):
      NEGATE on the rejected response of every pair after relabelling
      (:func:`~trace_realign.core.triage.relabelled`): y_w for INVERT (the old winner, which the
      new policy rejects), y_l for PUNISH and RETAIN; no RETAIN term.
    """
    from trace_realign.core.triage import TriageType, relabelled

    if method != "trace":
        return baseline_samples(triaged, encoder, method)
    out: list[Sample] = []
    for t in triaged:
        p = t.pair
        if not use_triage:
            pair = relabelled(t)
            if pair is not None:
                out.append(Sample(p.pair_id, SampleKind.NEGATE, (encoder.sequence(p.prompt, pair[1]),)))
        elif t.type is TriageType.INVERT:
            seqs = (encoder.sequence(p.prompt, p.rejected), encoder.sequence(p.prompt, p.chosen))
            out.append(Sample(p.pair_id, SampleKind.PREFER, seqs))
        elif t.type is TriageType.PUNISH:
            if use_corrections and t.correction:
                seqs = (encoder.sequence(p.prompt, t.correction), encoder.sequence(p.prompt, p.chosen))
                out.append(Sample(p.pair_id, SampleKind.PREFER, seqs))
            else:
                seqs = (encoder.sequence(p.prompt, p.chosen), encoder.sequence(p.prompt, p.rejected))
                out.append(Sample(p.pair_id, SampleKind.PUNISH, seqs))
        elif t.type is TriageType.RETAIN and use_kl:
            out.append(Sample(p.pair_id, SampleKind.RETAIN, (encoder.sequence(p.prompt, p.chosen),)))
    return out


def baseline_samples(triaged: Sequence["TriagedPair"], encoder: "Encoder", method: Method) -> list[Sample]:
    """The samples of a baseline ``method`` (see :func:`build_samples`). Raises ValueError for an
    unknown method or for ``trace``."""
    from trace_realign.core.triage import TriageType, gold_view, relabelled

    out: list[Sample] = []
    for t in triaged:
        p = t.pair
        if method == "gold_dpo":
            t = gold_view(t)
        if method in ("naive_relabel_dpo", "robust_dpo", "gold_dpo"):
            pair = relabelled(t)
            if pair is not None and t.type is not TriageType.PUNISH:
                seqs = (encoder.sequence(p.prompt, pair[0]), encoder.sequence(p.prompt, pair[1]))
                out.append(Sample(p.pair_id, SampleKind.PREFER, seqs))
        elif method == "npo":
            for response, compliant in ((p.chosen, t.chosen_compliant), (p.rejected, t.rejected_compliant)):
                if compliant is False:
                    out.append(Sample(p.pair_id, SampleKind.NEGATE, (encoder.sequence(p.prompt, response),)))
        else:
            raise ValueError(f"unknown baseline method '{method}' (use naive_relabel_dpo, robust_dpo, npo or gold_dpo)")
    return out
