"""Stage 3 of TRACE: the gold batch, the alignment direction g_F and exact impact scores.

``g_F = grad_theta sum_{gold} L_DPO`` at theta_ref; for every conflict sample i,
``s_i = <g_F, grad_theta L_i>`` at theta_ref; ``w_i = max(0, s_i) / sum_k max(0, s_k)`` (the sum
replaced by 1 when it is 0). Gradients are over the trainable parameters (a LoRA adapter, or all
weights under full fine-tuning).

How the scores are computed (once, at theta_ref, as arXiv 2511.02623's stage 3 prescribes): the
samples of a batch do not interact, so one batched backward of the summed losses carries each row's own output gradient ``d`` at
every layer. For a linear layer ``y = W a + b`` the per-sample gradient is
``sum_t d_t a_t^T`` (and ``sum_t d_t`` for the bias), so
``<G, grad_W L_i> = sum_t d_{i,t} . (G a_{i,t})``: forward hooks compute ``G a`` (or keep ``a``),
tensor hooks multiply with ``d`` when it arrives, and no per-sample weight gradient is ever
formed. Embeddings (``G[token] . d``) and RMSNorm/LayerNorm scales (``d . (G * x_hat)``) work the
same way. The backward is taken with respect to one scalar leaf added to the input embeddings,
so autograd computes the activation gradients the hooks need and no weight gradient at all.
The forward pass is the one at theta_ref, so it yields the reference log-probs too.

At theta_ref every log-ratio is 0, so ``dL_i / d log p(y)`` is a constant per sample kind and
slot (e.g. -beta/2 and +beta/2 for DPO). ``grad L_i`` is therefore ``sum_y c_y grad log p(y)``
over the sample's sequences, and the sequences are independent rows: they are sorted by length
and batched on their own, so the two responses of a pair need not be padded to each other.

``brute_force_scores`` is the authors' procedure (one backward per sample, flattened dot
product); it is kept as the reference the tests compare against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trace_realign.core.errors import TraceError
from trace_realign.core.logprobs import sequence_logps
from trace_realign.core.modeling import eval_mode, trainable_parameters
from trace_realign.core.objective import PunishForm, Sample, SampleKind, conflict_losses, flatten_sequences, gather_pairs
from trace_realign.core.tokenization import Encoder, pad_sequences

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- gold batch


@dataclass(frozen=True)
class GoldPair:
    """A pair of the gold batch: ``preferred`` should win over ``dispreferred`` under the new policy."""

    pair_id: str
    prompt: object
    preferred: str
    dispreferred: str
    source: str  # retain | invert | punish | user


def gold_samples(gold: Sequence[GoldPair], encoder: Encoder) -> list[Sample]:
    """PREFER samples (preferred over dispreferred) of the gold batch."""
    return [
        Sample(g.pair_id, SampleKind.PREFER, (encoder.sequence(g.prompt, g.preferred), encoder.sequence(g.prompt, g.dispreferred)))
        for g in gold
    ]



def build_gold_batch(
    retain: Sequence,
    invert: Sequence,
    punish: Sequence,
    compliant_pool: Sequence[str],
    size: int = 64,
    seed: int = 0,
) -> list[GoldPair]:
    """The gold batch (arXiv 2511.02623, stage 3), drawn from the training data with a fixed seed.

    A third RETAIN pairs as they are, a third INVERT pairs flipped, the rest PUNISH prompts
    paired as (a random compliant response from the pool, y_w). Pairs are objects with
    ``pair_id, prompt, chosen, rejected``. When a type has too few pairs the others fill in.
    """
    rng = random.Random(seed)
    want = {"retain": size // 3, "invert": size // 3}
    want["punish"] = size - want["retain"] - want["invert"]
    pools = {"retain": list(retain), "invert": list(invert), "punish": list(punish) if compliant_pool else []}
    for pool in pools.values():
        rng.shuffle(pool)
    take = {k: min(want[k], len(pools[k])) for k in want}
    short = size - sum(take.values())
    for k in ("retain", "invert", "punish"):  # refill from the types that have more
        extra = min(short, len(pools[k]) - take[k])
        take[k] += extra
        short -= extra
    gold: list[GoldPair] = []
    for p in pools["retain"][: take["retain"]]:
        gold.append(GoldPair(p.pair_id, p.prompt, p.chosen, p.rejected, "retain"))
    for p in pools["invert"][: take["invert"]]:
        gold.append(GoldPair(p.pair_id, p.prompt, p.rejected, p.chosen, "invert"))
    for p in pools["punish"][: take["punish"]]:
        gold.append(GoldPair(p.pair_id, p.prompt, rng.choice(list(compliant_pool)), p.chosen, "punish"))
    return gold


# --------------------------------------------------------------------------- helpers


def _batches(n: int, batch_size: int, order: Sequence[int]) -> Iterable[list[int]]:
    for start in range(0, n, batch_size):
        yield list(order[start : start + batch_size])


def _length_order(samples: Sequence[Sample]) -> list[int]:
    """Sample indices sorted by their longest sequence, so batches carry little padding."""
    return sorted(range(len(samples)), key=lambda i: max(len(s.input_ids) for s in samples[i].sequences))


def _batch_logps(model, samples: Sequence[Sample], pad_token_id: int, chunked: bool = True):
    sequences, row_sample, row_slot = flatten_sequences(samples)
    device = next(model.parameters()).device
    batch = pad_sequences(sequences, pad_token_id).to(device)
    logps = sequence_logps(model, batch, chunked=chunked)
    return gather_pairs(logps, row_sample.to(device), row_slot.to(device), len(samples)), row_sample


def _kinds(samples: Sequence[Sample], device) -> torch.Tensor:
    return torch.tensor([int(s.kind) for s in samples], dtype=torch.long, device=device)


def loss_coefficients(samples: Sequence[Sample], beta: float, punish_form: PunishForm = "trace") -> torch.Tensor:
    """``dL_i / d log p(sequence)`` at theta_ref (every log-ratio 0), shape [S, 2], float64.

    Taken by autograd through the very loss functions the trainer uses, so the scores follow
    any change to them.
    """
    at_ref = torch.zeros((len(samples), 2), dtype=torch.float64, requires_grad=True)
    losses = conflict_losses(_kinds(samples, "cpu"), at_ref, at_ref.detach(), beta, punish_form)
    (coef,) = torch.autograd.grad(losses.sum(), [at_ref])
    return coef


@dataclass(frozen=True)
class _Row:
    sample: int
    slot: int
    coef: float
    length: int


def _rows(samples: Sequence[Sample], coef: torch.Tensor) -> list[_Row]:
    """Every sequence of every sample as a row, sorted by length (little padding per batch)."""
    rows = [
        _Row(i, j, float(coef[i, j]), len(seq.input_ids))
        for i, s in enumerate(samples)
        for j, seq in enumerate(s.sequences)
    ]
    return sorted(rows, key=lambda r: r.length)


def _row_batches(samples, rows: list[_Row], rows_per_batch: int, pad_token_id: int, device):
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start : start + rows_per_batch]
        batch = pad_sequences([samples[r.sample].sequences[r.slot] for r in chunk], pad_token_id).to(device)
        coef = torch.tensor([r.coef for r in chunk], dtype=torch.float32, device=device)
        yield chunk, batch, coef


# --------------------------------------------------------------------------- g_F


def gold_gradient(
    model,
    gold: Sequence[Sample],
    beta: float,
    pad_token_id: int,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[nn.Parameter, torch.Tensor]:
    """``g_F = grad sum_{gold} L_DPO`` at theta_ref, keyed by trainable parameter (float32).

    ``batch_size`` counts pairs; a batch holds ``2 * batch_size`` sequences.
    """
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise TraceError("the model has no trainable parameters")
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = next(model.parameters()).device
    rows = _rows(gold, loss_coefficients(gold, beta))
    with eval_mode(model), torch.enable_grad():
        for chunk, batch, coef in _row_batches(gold, rows, 2 * batch_size, pad_token_id, device):
            logps = sequence_logps(model, batch)
            grads = torch.autograd.grad((coef * logps).sum(), params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += g.float()
            if progress:
                progress(len(chunk) / 2)
    return dict(zip(params, acc))


# --------------------------------------------------------------------------- exact batched scores


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and (
        hasattr(module, "variance_epsilon") or hasattr(module, "eps")
    )


class _ScoreHooks:
    """Forward hooks that turn each row's output gradients into ``<g_F, grad L_row>``."""

    def __init__(self, model: nn.Module, g_f: dict[nn.Parameter, torch.Tensor]):
        self.g_f = {id(p): g for p, g in g_f.items()}
        self.row_scores: torch.Tensor | None = None
        self.dummy: torch.Tensor | None = None
        self.handles = []
        self.hooks_head = False  # a trainable LM head is hooked: its module must run on every position
        head = model.get_output_embeddings()
        embeddings = model.get_input_embeddings()
        # Registered first, so the scoring hook of a trainable embedding sees the sum.
        self.handles.append(embeddings.register_forward_hook(self._add_dummy))
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            blocks = {n: self.g_f.get(id(p)) for n, p in own}
            if all(g is None or not bool(g.any()) for g in blocks.values()):
                continue  # g_F is exactly zero here (e.g. LoRA A at B = 0): no contribution
            if isinstance(module, nn.Linear):
                hook = self._linear_hook(blocks.get("weight"), blocks.get("bias"))
            elif isinstance(module, nn.Embedding):
                hook = self._embedding_hook(blocks.get("weight"), module)
            elif isinstance(module, nn.LayerNorm):
                hook = self._layer_norm_hook(blocks.get("weight"), blocks.get("bias"), module)
            elif _is_rms_norm(module) and set(blocks) == {"weight"}:
                hook = self._rms_norm_hook(blocks["weight"], module)
            else:
                self.remove()
                raise TraceError(
                    f"impact scores: trainable parameter '{name}.{own[0][0]}' of a {type(module).__name__} "
                    "is not supported (supported: Linear, Embedding, LayerNorm, RMSNorm); freeze it or use LoRA"
                )
            self.handles.append(module.register_forward_hook(hook))
            self.hooks_head = self.hooks_head or module is head

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, n_rows: int, device):
        self.row_scores = torch.zeros(n_rows, dtype=torch.float64, device=device)  # [R]: s_i per row
        self.dummy = torch.zeros((), device=device, requires_grad=True)  # []: makes every hooked output need a grad

    def _add_dummy(self, module, args, output):
        return output + self.dummy.to(output.dtype)

    def _accumulate(self, d: torch.Tensor, q: torch.Tensor):
        # d, q: [R, T, H] (output gradient, G applied to the input) -> [R]: sum over tokens and features
        self.row_scores += (d.float() * q).flatten(1).sum(1, dtype=torch.float64)

    def _on_grad(self, output: torch.Tensor, make_q: Callable[[], torch.Tensor]):
        output.register_hook(lambda d: self._accumulate(d, make_q()))

    def _linear_hook(self, g_w, g_b):
        def hook(module, args, output):
            a = args[0]  # [R, T, in_features]

            # q must not reference ``output``: the hook lives on ``output``, and a cycle through it
            # would keep every batch's activations alive until the garbage collector runs.
            shape = a.shape[:-1] + (module.out_features,)  # [R, T, out_features]

            def q():
                # G_W a: [R, T, in] x [out, in]^T -> [R, T, out]; G_b broadcasts over [R, T]
                out = F.linear(a.float(), g_w) if g_w is not None else a.new_zeros(shape, dtype=torch.float32)
                return out + g_b if g_b is not None else out

            if g_w is not None and module.out_features <= module.in_features:
                ready = q()  # smaller than the input: keep G a instead of a
                self._on_grad(output, lambda: ready)
            else:
                self._on_grad(output, q)

        return hook

    def _embedding_hook(self, g_w, module):
        def hook(mod, args, output):
            ids = args[0]  # [R, T] token ids
            self._on_grad(output, lambda: F.embedding(ids, g_w))  # G[token]: [R, T, H]

        return hook

    def _rms_norm_hook(self, g_w, module):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

        def hook(mod, args, output):
            x = args[0]  # [R, T, H]

            def q():
                xf = x.float()
                x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # [R, T, H]
                return g_w * x_hat.float()  # [H] * [R, T, H] -> [R, T, H]

            self._on_grad(output, q)

        return hook

    def _layer_norm_hook(self, g_w, g_b, module):
        def hook(mod, args, output):
            x = args[0]  # [R, T, H]

            def q():
                x_hat = F.layer_norm(x.float(), mod.normalized_shape, None, None, mod.eps)  # [R, T, H]
                out = g_w * x_hat if g_w is not None else torch.zeros_like(x_hat)  # [R, T, H]
                return out + g_b if g_b is not None else out

            self._on_grad(output, q)

        return hook


@dataclass
class ScoreResult:
    """Impact scores [S] (float64) and reference log-probs [S, 2] of the scored samples."""

    scores: torch.Tensor
    ref_logps: torch.Tensor


def impact_scores(
    model,
    samples: Sequence[Sample],
    g_f: dict[nn.Parameter, torch.Tensor],
    beta: float,
    pad_token_id: int,
    punish_form: PunishForm = "trace",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> ScoreResult:
    """Exact ``s_i = <g_F, grad L_i>`` and the reference log-probs, from one batched pass per batch.

    ``batch_size`` counts pairs; a batch holds ``2 * batch_size`` sequences.
    """
    n = len(samples)
    scores = torch.zeros(n, dtype=torch.float64)
    ref = torch.zeros((n, 2), dtype=torch.float32)
    rows = _rows(samples, loss_coefficients(samples, beta, punish_form))
    hooks = _ScoreHooks(model, g_f)
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.enable_grad():
            for chunk, batch, coef in _row_batches(samples, rows, 2 * batch_size, pad_token_id, device):
                hooks.start(len(chunk), device)
                logps = sequence_logps(model, batch, chunked=not hooks.hooks_head)
                torch.autograd.grad((coef * logps).sum(), [hooks.dummy])
                sample_idx = torch.tensor([r.sample for r in chunk], dtype=torch.long)
                slot_idx = torch.tensor([r.slot for r in chunk], dtype=torch.long)
                scores.index_add_(0, sample_idx, hooks.row_scores.cpu())
                ref[sample_idx, slot_idx] = logps.detach().float().cpu()
                if progress:
                    progress(len(chunk) / 2)
    finally:
        hooks.remove()
    return ScoreResult(scores, ref)


def brute_force_scores(
    model,
    samples: Sequence[Sample],
    g_f: dict[nn.Parameter, torch.Tensor],
    beta: float,
    pad_token_id: int,
    punish_form: PunishForm = "trace",
    progress: Progress | None = None,
) -> torch.Tensor:
    """The authors' procedure: per sample, one backward at batch size 1 and a flattened dot product."""
    params = [p for _, p in trainable_parameters(model)]
    flat_gf = torch.cat([g_f[p].reshape(-1).double() for p in params])
    out = torch.zeros(len(samples), dtype=torch.float64)
    with eval_mode(model), torch.enable_grad():
        for i, s in enumerate(samples):
            policy, _ = _batch_logps(model, [s], pad_token_id, chunked=False)  # full logits, as the authors do
            loss = conflict_losses(_kinds([s], policy.device), policy, policy.detach(), beta, punish_form).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)]
            )
            out[i] = torch.dot(flat_gf, flat)
            if progress:
                progress(1)
    return out


@torch.no_grad()
def reference_logps(
    model, samples: Sequence[Sample], pad_token_id: int, batch_size: int = 8, progress: Progress | None = None
) -> torch.Tensor:
    """Reference log-probs [S, 2] without gradients (for samples that are not scored)."""
    ref = torch.zeros((len(samples), 2), dtype=torch.float32)
    with eval_mode(model):
        for idx in _batches(len(samples), batch_size, _length_order(samples)):
            policy, _ = _batch_logps(model, [samples[i] for i in idx], pad_token_id)
            ref[torch.tensor(idx, dtype=torch.long)] = policy.float().cpu()
            if progress:
                progress(len(idx))
    return ref


def impact_weights(scores: torch.Tensor) -> torch.Tensor:
    """``w_i = max(0, s_i) / sum_k max(0, s_k)``; the denominator is 1 when the sum is 0."""
    clipped = scores.clamp(min=0)
    total = clipped.sum()
    return clipped / (total if total > 0 else 1.0)
