"""Per-sample losses of TRACE (arXiv 2511.02623, stage 2: the INVERT, PUNISH and RETAIN terms) and
of its baselines: Robust DPO (Chowdhury et al., arXiv 2403.00409) and NPO (Zhang et al., arXiv 2404.05868).

Every function returns a tensor of shape [B] with no reduction. Log-probabilities are sums over
response tokens; ``r(y) = log p_theta(y|x) - log p_ref(y|x)`` and
``Delta(x, y1, y2) = r(y1) - r(y2)``.
"""

from __future__ import annotations

import torch.nn.functional as F


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """Delta(x, y_chosen, y_rejected) = r(chosen) - r(rejected)."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO: ``-log sigmoid(beta * Delta(x, y_chosen, y_rejected))``.

    INVERT is this loss on the swapped pair (old loser as chosen); PUNISH with an oracle
    correction is this loss with the correction as chosen and the old winner as rejected.
    """
    delta = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


def robust_dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, epsilon
):
    """Robust DPO (Chowdhury et al., arXiv 2403.00409) for a label-flip rate ``epsilon`` in [0, 0.5):

    ``[(1 - eps) * L_DPO(y_w, y_l) - eps * L_DPO(y_l, y_w)] / (1 - 2 eps)``.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust_dpo_loss: epsilon must be in [0, 0.5), got {epsilon}")
    delta = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    forward = -F.logsigmoid(beta * delta)
    backward = -F.logsigmoid(-beta * delta)
    return ((1.0 - epsilon) * forward - epsilon * backward) / (1.0 - 2.0 * epsilon)


def npo_loss(policy_logps, ref_logps, beta):
    """NPO as in its paper (Zhang et al., arXiv 2404.05868, the NPO loss): ``-(2 / beta) * log sigmoid(-beta * r(y))``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logps - ref_logps))


def punish_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRACE's dual negative preference for PUNISH pairs (no 2/beta factor, as the authors' code):

    ``-log sigmoid(-beta * r(y_w)) - log sigmoid(-beta * r(y_l))``.
    """
    r_chosen = policy_chosen_logps - ref_chosen_logps
    r_rejected = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(-beta * r_chosen) - F.logsigmoid(-beta * r_rejected)


def punish_loss_npo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The dual negative preference in the NPO paper's scale: ``npo(y_w) + npo(y_l)`` (with 2/beta)."""
    return npo_loss(policy_chosen_logps, ref_chosen_logps, beta) + npo_loss(
        policy_rejected_logps, ref_rejected_logps, beta
    )


def token_kl(ref_logits, policy_logits):
    """``KL(p_ref || p_theta)`` of each next-token distribution: logits [..., V] -> [...] (float32, nats).

    The RETAIN term of arXiv 2511.02623 (the KL to the frozen reference on RETAIN responses).
    """
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    policy_logp = F.log_softmax(policy_logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)


def retain_kl(ref_logits, policy_logits, mask):
    """RETAIN: per sample, the mean over masked tokens of ``KL(p_ref || p_theta)`` over the vocabulary.

    ``ref_logits`` and ``policy_logits`` are [B, T, V]; ``mask`` is [B, T] (1 on the response
    tokens whose next-token distributions are compared). A sample with no masked token gives 0.
    """
    per_token = token_kl(ref_logits, policy_logits)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
