"""Response log-probs without full-vocabulary logits, against hand values and the full-logits path."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_text
from trace_realign.core.config import LoraConfig
from trace_realign.core.logprobs import (
    forward_logits,
    full_vocabulary_logits,
    response_logps,
    response_tokens,
    sequence_logps,
    target_logprobs,
)
from trace_realign.core.losses import retain_kl, token_kl
from trace_realign.core.modeling import add_lora, load_model
from trace_realign.core.tokenization import Encoder, pad_sequences


def test_target_logprobs_by_hand():
    # two hidden states over a 3-token vocabulary; logits = hidden @ weight^T
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # row 0: logits (1, 0, 1), target 2 -> 1 - log(e + 1 + e); row 1: logits (0, 2, 2), target 0 -> 0 - log(1 + 2 e^2)
    expected = torch.tensor([1 - math.log(2 * math.e + 1), -math.log(1 + 2 * math.e**2)])
    got = target_logprobs(hidden, weight, torch.tensor([2, 0]), chunk_rows=1)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_trainable", [False, True])
def test_target_logprobs_gradient_by_hand(head_trainable):
    # d out_r / d hidden_r = (onehot(y_r) - softmax(z_r)) @ weight; the data of the test above:
    # row 0: (-e, -1, e + 1) / (2e + 1) @ weight = (1, e) / (2e + 1)
    # row 1: (2e^2, -e^2, -e^2) / (1 + 2e^2) @ weight = (e^2, -2e^2) / (1 + 2e^2)
    # A frozen head takes the fused path (the direction formed in the forward), a trainable one the
    # backward that recomputes the logits; the incoming gradients (3, -0.5) scale the rows.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=head_trainable)
    e = math.e
    expected = torch.tensor([[3 * 1 / (2 * e + 1), 3 * e / (2 * e + 1)], [-0.5 * e**2 / (1 + 2 * e**2), -0.5 * -2 * e**2 / (1 + 2 * e**2)]])
    got = target_logprobs(hidden, weight, torch.tensor([2, 0]), chunk_rows=1)
    (grad,) = torch.autograd.grad((got * torch.tensor([3.0, -0.5])).sum(), [hidden])
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_trainable", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_target_logprobs_and_gradients_equal_a_full_log_softmax(chunk_rows, head_trainable):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 6, generator=gen, dtype=torch.float64, requires_grad=head_trainable)
    targets = torch.randint(0, 50, (10,), generator=gen)
    upstream = torch.randn(10, generator=gen, dtype=torch.float64)
    wrt = [hidden, weight] if head_trainable else [hidden]

    brute = F.log_softmax(hidden @ weight.T, dim=-1)[torch.arange(10), targets]  # [10]
    expected = torch.autograd.grad((brute * upstream).sum(), wrt)
    got = target_logprobs(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad((got.double() * upstream).sum(), wrt)

    torch.testing.assert_close(got.double(), brute, rtol=1e-6, atol=1e-6)  # float32 outputs
    for g, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-6)


def batch_of(tokenizer, n=6, seed=0):
    rng = random.Random(seed)
    enc = Encoder(tokenizer, max_length=64)
    seqs = [enc.sequence(random_text(rng, rng.randint(2, 12)), random_text(rng, rng.randint(1, 20))) for _ in range(n)]
    return pad_sequences(seqs, tokenizer.pad_token_id)


def lora_model(tiny_model_dir, seed=1):
    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=seed)
    with torch.no_grad():  # B = 0 at init would hide the adapter from the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def float64_gradients(model, batch, upstream):
    """Gradients of ``sum(upstream * response log-probs)`` with the model, its logits and the
    log-softmax in float64 (the model is returned to float32): the truth both float32 paths round."""
    model.double()
    try:
        logits = forward_logits(model, batch)  # [N, T, V] float64
        pred, targets, mask = logits[:, :-1], batch.input_ids[:, 1:], batch.response_mask[:, 1:]
        logps = (pred.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)  # [N]
        return [g.detach() for g in torch.autograd.grad((logps * upstream.double()).sum(), trainable(model))]
    finally:
        model.float()


def assert_gradients_match(fast, full, truth):
    """The chunked path's float32 gradients ``fast`` equal the full path's ``full`` to 1e-5
    (normwise, each tensor) and are no further from the float64 ``truth`` than twice the full
    path's own rounding error: element by element the two float32 paths, which sum in different
    orders, differ by rounding (a few 1e-6 where an element cancels), as the full path differs
    from the truth."""
    for f, g, t in zip(fast, full, truth, strict=True):
        f, g = f.double(), g.double()
        assert (f - g).norm() <= 1e-5 * g.norm(), ((f - g).norm() / g.norm()).item()
        assert (f - t).norm() <= 2 * (g - t).norm() + 1e-6 * t.norm(), ((f - t).norm().item(), (g - t).norm().item())


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logps_and_gradients_equal_the_full_logits_path(tiny_model_dir, tiny_tied_model_dir, tiny_tokenizer, tied):
    model = lora_model(tiny_tied_model_dir if tied else tiny_model_dir)
    batch = batch_of(tiny_tokenizer)
    upstream = torch.linspace(-1, 1, batch.input_ids.shape[0])

    full = response_logps(forward_logits(model, batch), batch)  # the reference: [N, T, V] logits
    full_grads = torch.autograd.grad((full * upstream).sum(), trainable(model))
    tokens = response_tokens(model, batch)
    assert tokens.hidden is not None and tokens.full_logits is None  # the chunked path ran
    assert tokens.rows.numel() == int(batch.response_mask[:, 1:].sum())
    fast = tokens.sequence_logps()
    fast_grads = torch.autograd.grad((fast * upstream).sum(), trainable(model))

    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert_gradients_match(fast_grads, full_grads, float64_gradients(model, batch, upstream))


def test_full_finetuning_gradients_reach_the_tied_head(tiny_tied_model_dir, tiny_tokenizer):
    model = load_model(tiny_tied_model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = batch_of(tiny_tokenizer, seed=3)
    full = torch.autograd.grad(response_logps(forward_logits(model, batch), batch).sum(), trainable(model))
    fast = torch.autograd.grad(sequence_logps(model, batch).sum(), trainable(model))
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight  # tied: the head's gradient adds to the embedding's
    ones = torch.ones(batch.input_ids.shape[0])
    assert_gradients_match(fast, full, float64_gradients(model, batch, ones))


def test_the_switch_and_a_model_with_scaled_logits_take_the_full_path(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir)
    batch = batch_of(tiny_tokenizer, seed=4)
    with torch.no_grad(), full_vocabulary_logits():
        tokens = response_tokens(model, batch)
    assert tokens.full_logits is not None and tokens.hidden is None

    # A head that is not ``lm_head(hidden)`` (as with logit soft-capping): found on first use.
    scaled = load_model(tiny_model_dir)
    scaled.lm_head.register_forward_hook(lambda module, args, out: out * 0.5)
    with torch.no_grad():
        expected = response_logps(forward_logits(scaled, batch), batch)
        tokens = response_tokens(scaled, batch)
        assert tokens.full_logits is not None
        torch.testing.assert_close(tokens.sequence_logps(), expected, rtol=1e-6, atol=1e-6)
        assert response_tokens(scaled, batch).full_logits is not None  # remembered
        plain = response_logps(forward_logits(model, batch), batch)
    assert not torch.allclose(expected, plain)  # the scaling matters, so the check above can fail


def test_retain_kl_on_response_tokens_equals_the_full_sequence_kl(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir, seed=5)
    batch = batch_of(tiny_tokenizer, seed=5)
    with torch.no_grad():
        with model.disable_adapter():
            ref_full = forward_logits(model, batch)
            ref_tokens = response_tokens(model, batch)
        policy_full = forward_logits(model, batch)
        policy_tokens = response_tokens(model, batch)
        expected = retain_kl(ref_full[:, :-1], policy_full[:, :-1], batch.response_mask[:, 1:])  # [N]
        per_token = token_kl(ref_tokens.logits(), policy_tokens.logits())  # [M]
    n = batch.input_ids.shape[0]
    count = torch.zeros(n).index_add(0, policy_tokens.rows, torch.ones_like(per_token))
    got = torch.zeros(n).index_add(0, policy_tokens.rows, per_token) / count.clamp(min=1)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_token_kl_by_hand():
    # p_ref = (1/2, 1/2), p_theta = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    policy = torch.log(torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(token_kl(ref, policy), torch.tensor([0.5 * math.log(2) + 0.5 * math.log(2 / 3)]))


def test_the_benchmark_compares_both_paths_on_the_tiny_model():
    """benchmarks/logprobs.py's smallest run: both paths of both stages, their outputs compared, and
    the breakdown of what autograd holds for backward, where only the loss row tells the paths apart."""
    import subprocess
    import sys

    from tests.test_pipeline import ROOT

    args = ["--model", "tiny-random", "--pairs", "4", "--gold", "2", "--steps", "1", "--repeats", "1"]
    proc = subprocess.run([sys.executable, "benchmarks/logprobs.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    metrics = dict(line.split("=") for line in lines if "=" in line and " " not in line)
    for key in ("reference_scores_max_rel_diff", "train_gradient_rel_diff"):
        assert float(metrics[key]) <= 1e-5, (key, metrics[key])
    # The adapters after Adam steps are printed, not bounded: Adam's first update is about
    # lr * sign(g), so an element whose gradient is near 0 turns the two paths' rounding into up to
    # 2 lr (LoRA B starts at 0); the gradients above are what the paths must agree on.
    assert math.isfinite(float(metrics["train_adapter_max_rel_diff"]))
    assert {"reference_speedup", "train_speedup", "reference_memory_ratio", "train_memory_ratio"} <= set(metrics)
    # the profile: each stage and path with its vocabulary-sized share; the full path's ceiling above 1
    start = lines.index(next(l for l in lines if l.startswith("profile (torch.profiler")))
    profiled = [line.split() for line in lines[start + 3 : start + 7]]
    assert [row[:2] for row in profiled] == [["reference", "full"], ["reference", "chunked"], ["train", "full"], ["train", "chunked"]]
    assert all(0 < float(row[4].rstrip("%")) < 100 and float(row[5].rstrip("x")) >= 1 for row in profiled)
    assert float(metrics["reference_speedup_ceiling"]) > 1 and float(metrics["train_speedup_ceiling"]) > 1
    assert "training 2 samples x 4 accumulation" in lines[0]  # the demo's shapes by default
    rows = {line.split()[0]: line.split()[-2:] for line in lines[lines.index(next(l for l in lines if l.startswith("held for"))) + 2 :] if line.startswith("  ")}
    loss_full, loss_chunked = map(float, rows["loss"])
    assert loss_full > loss_chunked
    assert all(full == chunked for name, (full, chunked) in rows.items() if name.startswith("transformers."))
