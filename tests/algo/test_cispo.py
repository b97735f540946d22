"""CISPO's token loss (MiniMax-M1, eq. 4) against a plain loop and hand-derived gradients, and the
loss-type table the group method reads."""

from __future__ import annotations

import pytest
import torch

from rlora.algo.cispo import cispo_token_loss
from rlora.algo.group import clipped_token_loss
from rlora.algo.loss_types import LOSS_TYPES, group_loss

F64 = torch.float64


def loop_cispo(logp, old, adv, mask, eps_max):
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = torch.exp(logp[i, t] - old[i, t]).item()
                out[i, t] = -min(rho, eps_max) * adv[i].item() * logp[i, t].item()
    return out


def batch():
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(4, 5, generator=g, dtype=F64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 5, generator=g, dtype=F64)  # ratios far from 1, either side
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_token_loss_matches_a_loop_and_clips_the_weight_only_from_above():
    logp, old, adv, mask = batch()
    loss, stats = cispo_token_loss(logp, old, adv, mask, epsilon_high=1.5)
    torch.testing.assert_close(loss.detach(), loop_cispo(logp.detach(), old, adv, mask, 1.5), rtol=0, atol=1e-12)
    rho = torch.exp(logp.detach() - old)
    expected = ((rho > 1.5) & (adv[:, None] > 0) & mask).sum() / mask.sum()
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(expected.item()) and expected > 0


def test_every_token_keeps_its_gradient_where_ppo_s_clip_would_zero_it():
    """d ℓ / d log π = −min(ρ, ε_max)·A: the weight is detached, and a token outside PPO's clip
    range still moves, where the clipped surrogate gives it no gradient."""
    logp, old, adv, mask = batch()
    loss, _ = cispo_token_loss(logp, old, adv, mask, epsilon_high=1.5)
    loss.sum().backward()
    rho = torch.exp(logp.detach() - old)
    expected = torch.where(mask, -torch.clamp(rho, max=1.5) * adv[:, None], torch.zeros((), dtype=F64))
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)
    logp.grad = None
    clipped, _ = clipped_token_loss(logp, old, adv, mask, 0.2, 0.2)
    clipped.sum().backward()
    outside = mask & ((rho > 1.2) & (adv[:, None] > 0) | (rho < 0.8) & (adv[:, None] < 0))
    assert outside.any() and (logp.grad[outside] == 0).all() and (expected[outside] != 0).all()


def test_cispo_is_a_row_of_the_table_aggregated_over_the_step_s_tokens():
    logp, old, adv, mask = batch()
    assert LOSS_TYPES["cispo"].divides_by_step_tokens and not LOSS_TYPES["grpo"].divides_by_step_tokens
    loss, _ = group_loss(logp, old, adv, mask, loss_type="cispo", epsilon=0.2, epsilon_high=5.0, level="token",
                         max_completion_length=5, step_tokens=30)
    assert loss.item() == pytest.approx(loop_cispo(logp.detach(), old, adv, mask, 5.0).sum().item() / 30)
    with pytest.raises(ValueError, match="needs epsilon_high"):
        cispo_token_loss(logp, old, adv, mask, epsilon_high=None)


def test_the_bias_corrected_kl_weights_k3_by_the_ratio_and_keeps_its_gradient():
    """TRL's use_bias_correction_kl: β·ρ·k3. On-policy (ρ = 1) the value is the plain term's, and
    the gradient gains β·k3 per token: d(ρ k3)/d log π = ρ k3 + ρ dk3/d log π."""
    from rlora.algo.kl import kl_k3

    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 4, generator=g, dtype=F64)
    ref = old + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 0.2], dtype=F64)
    grads, values = [], []
    for corrected in (False, True):
        logp = old.clone().requires_grad_()
        loss, stats = group_loss(logp, old, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=None,
                                 level="token", max_completion_length=4, beta=0.5, ref_logprobs=ref, step_tokens=12,
                                 kl_bias_correction=corrected)
        loss.backward()
        grads.append(logp.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1])
    torch.testing.assert_close(grads[1] - grads[0], 0.5 * kl_k3(old, ref) / 12, rtol=0, atol=1e-12)
