"""The reference stage: everything computed once at theta_ref before training.

From the triaged pairs: the training samples, the gold batch, ``g_F``, the exact impact score
and weight of every conflict sample, and the reference log-probs the losses need, the last two
from one shared batched pass (arXiv 2511.02623, stage 2, the alignment impact score). The
weights table (:data:`WEIGHTS_SCHEMA`) carries them to training, which rebuilds the same samples
and joins them back in sample order (:func:`training_samples`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch

from trace_realign.core.config import ReferenceTrainingConfig, TriageConfig, WeightsConfig
from trace_realign.core.data import canonical_json, load_pairs
from trace_realign.core.distributed import Launch, RankJob, init_process_group, rank_device, run_job
from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.impact import (
    GoldPair,
    build_gold_batch,
    gold_gradient,
    gold_samples,
    impact_scores,
    impact_weights,
    reference_logps,
)
from trace_realign.core.modeling import trainable_model
from trace_realign.core.objective import Sample, SampleKind, build_samples
from trace_realign.core.tokenization import Encoder
from trace_realign.core.triage import TRAINABLE, TriagedPair, TriageType, gold_view

WEIGHTS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("triage", pa.string()),
        ("kind", pa.string()),
        ("impact_score", pa.float64()),
        ("weight", pa.float64()),
        ("ref_logp_a", pa.float64()),
        ("ref_logp_b", pa.float64()),
        ("confidence", pa.float64()),
    ]
)
"""One row per sample: its pair, triage type and :class:`SampleKind` (lower case), the raw impact
score ``s_i`` (null for RETAIN and without weighting), the weight ``w_i`` (summing to 1 over
conflict samples, 0 for RETAIN), the reference log-probs of its first and second sequence (nats)
and the confidence factor ``c_i`` of ``weights.confidence`` (:func:`confidence_factor`; 1 without
it), folded into ``w_i`` and multiplying a RETAIN sample's KL term."""


def confidence_factor(t: TriagedPair) -> float:
    """``c_i`` of a sample of pair ``t``: the probability the judge gave the verdicts that made its
    triage type, a verdict without a confidence counting 1. INVERT and PUNISH: the product of the
    chosen and rejected verdicts' confidences (both verdicts decide the type); RETAIN: the chosen
    verdict's (``c_w = 1`` alone decides it); UNKNOWN: 1."""
    chosen = 1.0 if t.chosen_confidence is None else t.chosen_confidence
    rejected = 1.0 if t.rejected_confidence is None else t.rejected_confidence
    if t.type in (TriageType.INVERT, TriageType.PUNISH):
        return chosen * rejected
    return chosen if t.type is TriageType.RETAIN else 1.0


@dataclass
class ReferenceOutput:
    samples: list[Sample]  # with weight (sum-normalised over conflict samples) and ref_logps set
    scores: dict[str, float]  # pair_id -> raw impact score s_i (conflict samples; empty without weighting)
    gold: list[GoldPair]
    stats: dict = field(default_factory=dict)


def encoder_for(tokenizer, training: ReferenceTrainingConfig) -> Encoder:
    """The encoder of the training samples: ``training.max_length`` tokens per sequence, at most
    ``training.max_prompt_length`` of them the prompt's."""
    return Encoder(tokenizer, max_length=training.max_length, max_prompt_length=training.max_prompt_length)


def triage_kinds(training: ReferenceTrainingConfig) -> tuple[str, ...]:
    """The triage types whose training pairs ``training.method`` reads: every type for ``gold_dpo``
    (its gold labels decide, so a pair the oracle left UNKNOWN, or that oracle noise moved, is
    still trained on by its gold labels), INVERT, PUNISH and RETAIN otherwise."""
    return tuple(t.value for t in (TriageType if training.method == "gold_dpo" else TRAINABLE))


def check_gold_labels(triaged: Sequence[TriagedPair], training: ReferenceTrainingConfig) -> None:
    """Raise ConfigError (one line naming the settings) when ``training.method`` is ``gold_dpo`` and
    no pair of ``triaged`` has a gold triage type (:func:`~trace_realign.core.triage.gold_view`):
    there is nothing to train on. Any other method passes."""
    if training.method != "gold_dpo" or any(gold_view(t).type is not TriageType.UNKNOWN for t in triaged):
        return
    raise ConfigError(
        "training.method: gold_dpo needs gold labels and no training pair has them: set triage.gold_labels_path "
        "(JSONL: prompt, response, compliant under the new policy), or use data with annotations that the "
        "policy's front-matter rules read"
    )


def samples_for(
    triaged: Sequence[TriagedPair], encoder: Encoder, training: ReferenceTrainingConfig, triage: TriageConfig
) -> list[Sample]:
    """The samples of ``training.method``'s objective for ``triaged``, with the ablation switches of
    the config. Raises ConfigError for ``gold_dpo`` without gold labels (:func:`check_gold_labels`)."""
    check_gold_labels(triaged, training)
    return build_samples(
        triaged, encoder, use_triage=triage.use_triage, use_kl=training.use_kl, use_corrections=triage.corrections,
        method=training.method,
    )  # fmt: skip


def compliant_pool(triaged: Sequence[TriagedPair]) -> list[str]:
    """Responses the oracle judged compliant: the candidates for PUNISH prompts' gold pairs."""
    pool = []
    for t in triaged:
        if t.chosen_compliant is True:
            pool.append(t.pair.chosen)
        if t.rejected_compliant is True:
            pool.append(t.pair.rejected)
    return pool


@dataclass(frozen=True)
class ScoreRanks:
    """Where the processes of a multi-process scoring (``training.num_processes`` > 1) find the
    model at theta_ref: the folder ``model_path`` in ``dtype`` on ``device`` (a ``model.device``
    setting) with the saved initial LoRA ``adapter`` (None under full fine-tuning). ``folder``
    receives the job (:func:`~trace_realign.core.distributed.run_job`); ``timeout`` (seconds, None:
    none) bounds it; ``echo`` shows the processes' output."""

    model_path: str
    adapter: str | None
    folder: str
    dtype: str = "float32"
    device: str = "auto"
    timeout: float | None = None
    echo: bool = True


def conflict_pass(
    model,
    gold: Sequence[Sample] | None,
    conflict: Sequence[Sample],
    training: ReferenceTrainingConfig,
    batch_size: int,
    pad_token_id: int,
    reporter: Callable[[str, int], Callable[[float], None] | None] = lambda stage, total: None,
    reduce: Callable[[dict], dict] = lambda g_f: g_f,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The scores [S] (float64; None without ``gold``) and reference log-probs [S, 2] of the S
    ``conflict`` samples at theta_ref: ``g_F`` over the ``gold`` samples, summed by ``reduce`` (the
    identity in one process; an all-reduce over processes that each took a slice of the gold
    batch), then the exact batched scores (:func:`~trace_realign.core.impact.impact_scores`).
    ``reporter(part, total)`` gives the progress callback of each part ("gold", "scores",
    "reference")."""
    if gold is None:
        return None, reference_logps(model, conflict, pad_token_id, batch_size, reporter("reference", len(conflict)))
    g_f = reduce(gold_gradient(model, gold, training.beta, pad_token_id, batch_size, reporter("gold", len(gold))))
    result = impact_scores(
        model, conflict, g_f, training.beta, pad_token_id, training.punish_form, batch_size, reporter("scores", len(conflict))
    )
    return result.scores, result.ref_logps


def scores_rank(job: RankJob) -> None:
    """One rank of a multi-process scoring (:data:`~trace_realign.core.distributed.JOBS`): the model
    at theta_ref on this rank's device, :func:`conflict_pass` on every ``world_size``-th gold and
    conflict sample from this rank's index, ``g_F`` all-reduced; writes ``scores-rank<r>.pt``
    (``index``, ``scores``, ``ref``)."""
    import torch.distributed as dist

    ranks = ScoreRanks(**job.spec["ranks"])
    training = ReferenceTrainingConfig.model_validate(job.spec["training"])
    payload = job.payload()
    device = rank_device(ranks.device)
    init_process_group()
    model = trainable_model(ranks.model_path, training, dtype=ranks.dtype, device=device, adapter=ranks.adapter)
    gold = payload["gold"]

    def all_reduce(g_f):
        for g in g_f.values():
            dist.all_reduce(g)
        return g_f

    index = list(range(job.rank, len(payload["conflict"]), job.world_size))
    scores, ref = conflict_pass(
        model,
        None if gold is None else gold[job.rank :: job.world_size],
        [payload["conflict"][i] for i in index],
        training,
        job.spec["batch_size"],
        job.spec["pad_token_id"],
        reduce=all_reduce,
    )
    torch.save({"index": index, "scores": scores, "ref": ref}, job.folder / f"scores-rank{job.rank}.pt")


def sharded_conflict_pass(
    ranks: ScoreRanks,
    launch: Launch,
    gold: Sequence[Sample] | None,
    conflict: Sequence[Sample],
    training: ReferenceTrainingConfig,
    batch_size: int,
    pad_token_id: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`conflict_pass` on ``launch.num_processes`` processes (:func:`scores_rank`), the ranks'
    slices put back in sample order. Raises
    :class:`~trace_realign.core.distributed.RankFailed` (stage ``reference``) when a rank fails."""
    spec = {
        "ranks": asdict(ranks), "training": training.model_dump(mode="json", include=set(ReferenceTrainingConfig.model_fields)),
        "batch_size": batch_size, "pad_token_id": pad_token_id,
    }  # fmt: skip
    folder = run_job(
        "scores", spec, {"gold": None if gold is None else list(gold), "conflict": list(conflict)}, ranks.folder, launch,
        stage="reference", echo=ranks.echo, timeout=ranks.timeout,
    )  # fmt: skip
    scores = None if gold is None else torch.zeros(len(conflict), dtype=torch.float64)
    ref = torch.zeros((len(conflict), 2), dtype=torch.float32)
    for rank in range(launch.num_processes):
        part = torch.load(folder / f"scores-rank{rank}.pt")
        index = torch.tensor(part["index"], dtype=torch.long)
        if scores is not None:
            scores[index] = part["scores"]
        ref[index] = part["ref"]
    return scores, ref


def run_reference_stage(
    model,
    tokenizer,
    triaged: Sequence[TriagedPair],
    training: ReferenceTrainingConfig,
    weights: WeightsConfig,
    triage: TriageConfig,
    *,
    seed: int = 0,
    user_gold: Sequence[GoldPair] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    ranks: ScoreRanks | None = None,
) -> ReferenceOutput:
    """Build samples and compute their weights and reference log-probs at theta_ref.

    ``model`` is at theta_ref: the base model with the initial LoRA adapter (B = 0, so the
    adapter changes nothing yet) or the base model itself under full fine-tuning. ``seed`` draws
    the gold batch (unless ``user_gold`` is given). ``progress(stage, done, total)`` is called as
    batches finish. Scores are ``s_i = <g_F, grad L_i>`` and weights ``w_i = max(0, s_i) / sum_k
    max(0, s_k)`` over the conflict samples (arXiv 2511.02623, stage 2); without
    ``weights.enabled`` every conflict sample weighs ``1 / N``. With ``weights.confidence`` (TRACE
    only, like impact weighting) each sample carries ``c_i`` (:func:`confidence_factor`):
    ``w_i = c_i max(0, s_i) / sum_k c_k max(0, s_k)``, or ``c_i / sum_k c_k`` without
    ``weights.enabled``.

    With ``training.num_processes`` above 1 the scores and reference log-probs come from that many
    processes (:func:`sharded_conflict_pass`; ``ranks`` says where they find the model, and is
    required then: TraceError without it); ``progress`` then reports nothing.
    """
    encoder = encoder_for(tokenizer, training)
    samples = samples_for(triaged, encoder, training, triage)
    conflict_idx = [i for i, s in enumerate(samples) if s.kind != SampleKind.RETAIN]
    conflict = [samples[i] for i in conflict_idx]
    pad = tokenizer.pad_token_id

    def reporter(stage, total):
        done = [0]

        def step(n):
            done[0] += n
            if progress:
                progress(stage, done[0], total)

        return step

    gold: list[GoldPair] = []
    scores: dict[str, float] = {}
    # The baselines train with uniform weights: impact weighting is TRACE's.
    weighted = weights.enabled and bool(conflict) and training.method == "trace"
    if weighted:
        if user_gold:
            gold = list(user_gold)
        else:
            by_type = {k: [t.pair for t in triaged if t.type is k] for k in TriageType}
            gold = build_gold_batch(
                by_type[TriageType.RETAIN],
                by_type[TriageType.INVERT],
                by_type[TriageType.PUNISH],
                compliant_pool(triaged),
                size=weights.gold_size,
                seed=seed,
            )
    gold_batch = gold_samples(gold, encoder) if weighted else None
    if training.num_processes > 1 and conflict:
        if ranks is None:
            raise TraceError("run_reference_stage: training.num_processes > 1 needs ranks (where the processes find the model)")
        raw, ref = sharded_conflict_pass(ranks, Launch.of(training), gold_batch, conflict, training, weights.batch_size, pad)
    else:
        raw, ref = conflict_pass(model, gold_batch, conflict, training, weights.batch_size, pad, reporter)
    by_pair = {t.pair.pair_id: t for t in triaged}
    scaled = weights.confidence and training.method == "trace"
    factors = [confidence_factor(by_pair[s.pair_id]) if scaled else 1.0 for s in samples]
    c = torch.tensor([factors[i] for i in conflict_idx], dtype=torch.float64)  # [S_conflict]
    if raw is not None:
        conflict_weights = impact_weights(raw * c if scaled else raw)
        scores = {s.pair_id: float(v) for s, v in zip(conflict, raw)}
    elif scaled and conflict:
        conflict_weights = c / c.sum()
    else:
        conflict_weights = torch.full((len(conflict),), 1.0 / max(1, len(conflict)), dtype=torch.float64)
    out = [replace(s, confidence=f) for s, f in zip(samples, factors)]
    for j, i in enumerate(conflict_idx):
        out[i] = replace(out[i], weight=float(conflict_weights[j]), ref_logps=(float(ref[j, 0]), float(ref[j, 1])))
    for i, s in enumerate(out):
        if s.kind == SampleKind.RETAIN:
            out[i] = replace(s, weight=0.0)
    stats = {
        "conflict_samples": len(conflict),
        "retain_samples": len(samples) - len(conflict),
        "gold_size": len(gold),
        "positive_scores": int(sum(1 for v in scores.values() if v > 0)),
        **({"confidence_factor_mean": sum(factors) / len(factors)} if scaled and factors else {}),
        **encoder.stats.as_dict(),
    }
    return ReferenceOutput(out, scores, gold, stats)


GOLD_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),  # text, or a chat as canonical JSON
        ("preferred", pa.string()),
        ("dispreferred", pa.string()),
        ("source", pa.string()),  # retain | invert | punish | user
    ]
)
"""One row per pair of the gold batch (``reference/gold-<sha8>.parquet``)."""


def gold_table(gold: Sequence[GoldPair]) -> pa.Table:
    """The gold batch as a table of :data:`GOLD_SCHEMA`."""
    rows = [
        {
            "pair_id": g.pair_id,
            "prompt": g.prompt if isinstance(g.prompt, str) else canonical_json(g.prompt),
            "preferred": g.preferred,
            "dispreferred": g.dispreferred,
            "source": g.source,
        }
        for g in gold
    ]
    return pa.Table.from_pylist(rows, schema=GOLD_SCHEMA)


def load_user_gold(path: str | Path) -> list[GoldPair]:
    """A user's own gold pairs (``weights.gold_path``: prompt, preferred, dispreferred, in any format
    :func:`~trace_realign.core.data.load_pairs` reads); its errors name the file and row."""
    res = load_pairs(path, columns={"chosen": "preferred", "rejected": "dispreferred"})
    return [GoldPair(p.pair_id, p.prompt, p.chosen, p.rejected, "user") for p in res.pairs]


def weights_table(output: ReferenceOutput, triaged: Sequence[TriagedPair]) -> pa.Table:
    """The reference stage's samples as a :data:`WEIGHTS_SCHEMA` table."""
    by_id = {t.pair.pair_id: t.type.value for t in triaged}
    rows = [
        {
            "pair_id": s.pair_id,
            "triage": by_id[s.pair_id],
            "kind": s.kind.name.lower(),
            "impact_score": output.scores.get(s.pair_id),
            "weight": s.weight,
            "ref_logp_a": s.ref_logps[0],
            "ref_logp_b": s.ref_logps[1],
            "confidence": s.confidence,
        }
        for s in output.samples
    ]
    return pa.Table.from_pylist(rows, schema=WEIGHTS_SCHEMA)


def training_samples(
    triaged: Sequence[TriagedPair],
    tokenizer,
    training: ReferenceTrainingConfig,
    triage: TriageConfig,
    weights: pa.Table,
    where: str = "weights table",
) -> list[Sample]:
    """The reference stage's samples again, each with its weight and reference log-probs from
    ``weights`` (a :data:`WEIGHTS_SCHEMA` table, one row per sample in sample order: a pair can
    give several samples, as under the npo baseline).

    Raises TraceError naming ``where`` when the rows are not these samples (the table is from
    other pairs or other settings).
    """
    rows = weights.to_pylist()
    samples = samples_for(triaged, encoder_for(tokenizer, training), training, triage)
    if len(rows) != len(samples):
        raise TraceError(f"{where}: {len(rows)} rows for {len(samples)} samples; rerun with --fresh reference")
    for i, (row, sample) in enumerate(zip(rows, samples)):
        if (row["pair_id"], row["kind"]) != (sample.pair_id, sample.kind.name.lower()):
            raise TraceError(
                f"{where}: row {i} is pair {row['pair_id']} ({row['kind']}), not this run's sample {i} "
                f"(pair {sample.pair_id}, {sample.kind.name.lower()}); rerun with --fresh reference"
            )
    return [
        replace(s, weight=r["weight"], ref_logps=(r["ref_logp_a"], r["ref_logp_b"]), confidence=r.get("confidence", 1.0))
        for s, r in zip(samples, rows)
    ]
