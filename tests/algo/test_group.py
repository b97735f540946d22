"""Group-method maths against hand-derived numbers and plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from rlora.algo import kl_k3
from rlora.algo.group import aggregate_loss, clipped_token_loss, group_advantages, overlong_penalty

F64 = torch.float64
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], dtype=F64)  # two groups of G = 3


def test_grpo_advantages_by_hand():
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / 1.0001; group 2: mean 4/3, std sqrt(16/3)
    out = group_advantages(REWARDS, 3, "grpo", "group")
    std2 = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001] + [(-4 / 3) / (std2 + 1e-4)] * 2 + [(8 / 3) / (std2 + 1e-4)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_batch_scaled_and_unscaled_advantages_by_hand():
    batch_std = REWARDS.std().item()  # over all six rewards
    centred = [-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3]
    torch.testing.assert_close(group_advantages(REWARDS, 3, "grpo", "batch"),
                               torch.tensor([c / (batch_std + 1e-4) for c in centred], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(group_advantages(REWARDS, 3, "grpo", "none"), torch.tensor(centred, dtype=F64),
                               rtol=0, atol=1e-12)  # Dr.GRPO


def test_rloo_is_the_reward_minus_the_mean_of_the_others():
    out = group_advantages(REWARDS, 3, "rloo")
    expected = [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 2.0, 0 - 2.0, 4 - 0.0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++_baseline"])
def test_advantages_sum_to_zero_within_each_group(estimator):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, generator=g, dtype=F64)
    out = group_advantages(rewards, 8, estimator).reshape(5, 8)
    torch.testing.assert_close(out.sum(1), torch.zeros(5, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "group"),
                                              ("reinforce++_baseline", "group")])
def test_equal_rewards_give_zero_advantages_and_no_nan(estimator, scale):
    out = group_advantages(torch.full((8,), 0.7), 4, estimator, scale)
    assert torch.equal(out, torch.zeros(8))


def test_reinforce_pp_keeps_the_reward_and_bad_settings_are_named():
    assert torch.equal(group_advantages(REWARDS, 3, "reinforce++"), REWARDS)
    with pytest.raises(ValueError, match="rloo needs num_generations >= 2"):
        group_advantages(REWARDS, 1, "rloo")
    with pytest.raises(ValueError, match="do not make whole groups of num_generations=4"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="advantage_estimator='ppo'"):
        group_advantages(REWARDS, 3, "ppo")


def test_overlong_penalty_by_hand():
    # L_max 20, buffer 5: no penalty up to 15 tokens, then -(L - 15)/5 * 1.0 down to -1 at 20
    out = overlong_penalty(torch.tensor([10, 15, 16, 18, 20]), 20, 5, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0]), rtol=0, atol=1e-7)


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.0, -1.0, -1.5]], dtype=F64)
    expected = [0.0, math.exp(1) - 1 - 1, math.exp(-1) + 1 - 1]
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([expected], dtype=F64), rtol=0, atol=1e-12)


def loop_token_loss(logp, old, adv, mask, eps, high):
    """The clipped surrogate of one token at a time, as a plain loop."""
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = math.exp(logp[i, t] - old[i, t])
                a = adv[i].item()
                out[i, t] = -min(rho * a, min(max(rho, 1 - eps), 1 + high) * a)
    return out


@pytest.mark.parametrize("high", [0.2, 0.28], ids=["symmetric", "clip-higher"])
def test_token_loss_matches_a_loop(high):
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(4, 5, generator=g, dtype=F64) * 2, -torch.rand(4, 5, generator=g, dtype=F64) * 2
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = clipped_token_loss(logp, old, adv, mask, 0.2, high)
    torch.testing.assert_close(loss, loop_token_loss(logp, old, adv, mask, 0.2, high), rtol=0, atol=1e-12)
    assert 0 <= stats["clip_ratio/low_mean"] <= 1 and 0 <= stats["clip_ratio/high_mean"] <= 1


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    logp = torch.tensor([[0.0, 0.2, 9.0]], dtype=F64)  # the third token is padding
    old = torch.zeros(1, 3, dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, _ = clipped_token_loss(logp, old, torch.tensor([1.0], dtype=F64), mask, 0.2, 0.2, level="sequence")
    s = math.exp(0.1)  # exp of the mean log-ratio over the two real tokens, inside the clip range
    torch.testing.assert_close(loss, torch.tensor([[-s, -s, 0.0]], dtype=F64), rtol=0, atol=1e-12)
    loss, _ = clipped_token_loss(logp * 10, old, torch.tensor([1.0], dtype=F64), mask, 0.2, 0.2, level="sequence")
    assert torch.allclose(loss[0, :2], torch.tensor(-1.2, dtype=F64))  # clipped per sequence at 1 + ε


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate_loss(per_token, mask, "grpo", 8).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(per_token, mask, "bnpo", 8).item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "dr_grpo", 8).item() == pytest.approx(10 / (2 * 8))
    assert aggregate_loss(per_token, mask, "dapo", 8, total_tokens=20).item() == pytest.approx(10 / 20)
    with pytest.raises(ValueError, match="needs total_tokens"):
        aggregate_loss(per_token, mask, "dapo", 8)


def test_dapo_gradient_does_not_depend_on_the_microbatching():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(8, 6, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() - 0.1 * torch.rand(8, 6, generator=g, dtype=F64)
    adv = torch.randn(8, generator=g, dtype=F64)
    mask = torch.rand(8, 6, generator=g) > 0.3
    mask[:, 0] = True
    grads = []
    for parts in (1, 4):
        logp.grad = None
        total = float(mask.sum())
        for index in torch.arange(8).chunk(parts):
            loss, _ = clipped_token_loss(logp[index], old[index], adv[index], mask[index], 0.2, 0.28)
            aggregate_loss(loss, mask[index], "dapo", 6, total_tokens=total).backward()
        grads.append(logp.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("estimator", "scale"), [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                                  ("rloo", "group"), ("reinforce++_baseline", "group")])
def test_an_unjudged_reward_is_left_out_of_its_group_and_gets_advantage_zero(estimator, scale):
    """TRL's nan-aware statistics: a completion no reward function judged (NaN) does not move its
    group's mean, std or leave-one-out baseline, and its own advantage is 0."""
    rewards = torch.tensor([1.0, float("nan"), 3.0, 6.0, 2.0, 2.0, float("nan"), 5.0], dtype=F64)
    out = group_advantages(rewards, 4, estimator, scale)
    assert out[1] == 0 and out[6] == 0 and not torch.isnan(out).any()
    g1, g2 = torch.tensor([1.0, 3.0, 6.0], dtype=F64), torch.tensor([2.0, 2.0, 5.0], dtype=F64)
    if estimator == "rloo":
        expected = [1 - (3 + 6) / 2, 3 - (1 + 6) / 2, 6 - (1 + 3) / 2, 2 - (2 + 5) / 2, 2 - (2 + 5) / 2, 5 - 2.0]
    elif estimator == "reinforce++_baseline" or scale == "none":
        expected = [*(g1 - g1.mean()).tolist(), *(g2 - g2.mean()).tolist()]
    elif scale == "group":
        expected = [*((g1 - g1.mean()) / (g1.std() + 1e-4)).tolist(), *((g2 - g2.mean()) / (g2.std() + 1e-4)).tolist()]
    else:
        both = torch.cat([g1, g2])
        expected = [*((g1 - g1.mean()) / (both.std() + 1e-4)).tolist(), *((g2 - g2.mean()) / (both.std() + 1e-4)).tolist()]
    judged = torch.tensor([0, 2, 3, 4, 5, 7])
    torch.testing.assert_close(out[judged], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
