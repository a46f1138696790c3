import math

import pytest
import torch
import torch.nn.functional as F

from trace_realign.core.losses import dpo_loss, npo_loss, punish_loss, punish_loss_npo, retain_kl, robust_dpo_loss

# The hand-computed example: chosen -12, rejected -15, ref chosen -13, ref rejected -14, beta 0.1.
PC, PR, RC, RR, BETA = -12.0, -15.0, -13.0, -14.0, 0.1


def t(*v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def test_hand_computed_values():
    pc, pr, rc, rr = t(PC), t(PR), t(RC), t(RR)
    assert dpo_loss(pc, pr, rc, rr, BETA).item() == pytest.approx(0.5981388694, abs=1e-6)
    assert robust_dpo_loss(pc, pr, rc, rr, BETA, 0.1).item() == pytest.approx(0.5731388694, abs=1e-6)
    assert npo_loss(pr, rr, BETA).item() == pytest.approx(12.8879332015, abs=1e-6)
    assert punish_loss(pc, pr, rc, rr, BETA).item() == pytest.approx(1.3887933201, abs=1e-6)
    # The NPO-paper scale multiplies each term by 2 / beta = 20.
    assert punish_loss_npo(pc, pr, rc, rr, BETA).item() == pytest.approx(20 * 1.3887933201, abs=1e-5)


def test_invert_is_dpo_on_swapped_pair():
    pc, pr, rc, rr = t(PC), t(PR), t(RC), t(RR)
    # Delta(y_l, y_w) = -2: -log sigmoid(-0.2) = log(1 + e^0.2)
    assert dpo_loss(pr, pc, rr, rc, BETA).item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-9)


def test_shapes_are_per_sample_without_reduction():
    b = 5
    x = torch.randn(4, b, dtype=torch.float64)
    assert dpo_loss(*x, 0.3).shape == (b,)
    assert robust_dpo_loss(*x, 0.3, 0.2).shape == (b,)
    assert npo_loss(x[0], x[1], 0.3).shape == (b,)
    assert punish_loss(*x, 0.3).shape == (b,)
    ref = torch.randn(b, 7, 11)
    assert retain_kl(ref, torch.randn(b, 7, 11), torch.ones(b, 7)).shape == (b,)


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_gradients_equal_the_written_formulas():
    pc, pr, rc, rr = t(PC), t(PR), t(RC), t(RR)
    beta, delta = BETA, (PC - RC) - (PR - RR)
    (g_c, g_r) = torch.autograd.grad(dpo_loss(pc, pr, rc, rr, beta), [pc, pr])
    # d/d pc [-log sig(beta Delta)] = -beta sig(-beta Delta); d/d pr = +beta sig(-beta Delta)
    assert g_c.item() == pytest.approx(-beta * _sig(-beta * delta), rel=1e-12)
    assert g_r.item() == pytest.approx(beta * _sig(-beta * delta), rel=1e-12)

    eps = 0.1
    (g_c,) = torch.autograd.grad(robust_dpo_loss(pc, pr, rc, rr, beta, eps), [pc])
    expected = ((1 - eps) * -beta * _sig(-beta * delta) - eps * beta * _sig(beta * delta)) / (1 - 2 * eps)
    assert g_c.item() == pytest.approx(expected, rel=1e-12)

    r_r = PR - RR
    (g,) = torch.autograd.grad(npo_loss(pr, rr, beta), [pr])
    # d/dr [-(2/beta) log sig(-beta r)] = 2 sig(beta r)
    assert g.item() == pytest.approx(2 * _sig(beta * r_r), rel=1e-12)

    r_c = PC - RC
    g_c, g_r = torch.autograd.grad(punish_loss(pc, pr, rc, rr, beta), [pc, pr])
    assert g_c.item() == pytest.approx(beta * _sig(beta * r_c), rel=1e-12)
    assert g_r.item() == pytest.approx(beta * _sig(beta * r_r), rel=1e-12)


def test_gradients_match_autograd_of_formula_on_random_batches():
    torch.manual_seed(0)
    x = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    beta = 0.3
    formula = -torch.log(torch.sigmoid(beta * ((x[0] - x[2]) - (x[1] - x[3]))))
    ours = dpo_loss(*x, beta)
    assert torch.allclose(ours, formula)
    for a, b in zip(torch.autograd.grad(ours.sum(), x), torch.autograd.grad(formula.sum(), x)):
        assert torch.allclose(a, b)


def test_robust_dpo_rejects_bad_epsilon():
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        robust_dpo_loss(x, x, x, x, 0.1, 0.5)


def test_retain_kl_hand_value_and_mask():
    # One sample, two tokens, vocabulary 2. Token 0: p_ref = (0.5, 0.5), p_theta = (0.8, 0.2).
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    pol = torch.tensor([[[math.log(0.8), math.log(0.2)], [5.0, -3.0]]])
    kl0 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    only_first = retain_kl(ref, pol, torch.tensor([[1, 0]]))
    assert only_first.item() == pytest.approx(kl0, abs=1e-6)
    p = F.softmax(ref[0, 1], -1)
    q = F.softmax(pol[0, 1], -1)
    kl1 = float((p * (p.log() - q.log())).sum())
    both = retain_kl(ref, pol, torch.tensor([[1, 1]]))
    assert both.item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    assert retain_kl(ref, pol, torch.tensor([[0, 0]])).item() == 0.0
    assert retain_kl(ref, ref, torch.ones(1, 2)).abs().item() < 1e-7


def test_retain_kl_matches_brute_force_loop():
    torch.manual_seed(1)
    ref, pol = torch.randn(3, 5, 13), torch.randn(3, 5, 13)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out = retain_kl(ref, pol, mask)
    for b in range(3):
        vals = []
        for t_ in range(5):
            if mask[b, t_]:
                p = torch.softmax(ref[b, t_].double(), -1)
                q = torch.softmax(pol[b, t_].double(), -1)
                vals.append(sum(float(p[v] * math.log(p[v] / q[v])) for v in range(13)))
        assert out[b].item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
