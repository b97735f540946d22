"""GAE against hand-derived numbers and a plain Python loop."""

from __future__ import annotations

import pytest
import torch

from rlora.algo import gae


def gae_loop(values, rewards, mask, gamma, lam):
    """Reference GAE: nested Python loops over rows and time, Python floats (float64)."""
    advantages = [[0.0] * len(row) for row in values]
    returns = [[0.0] * len(row) for row in values]
    for i in range(len(values)):
        n = sum(bool(m) for m in mask[i])
        next_adv = 0.0
        for j in reversed(range(n)):
            next_value = values[i][j + 1] if j + 1 < n else 0.0
            delta = rewards[i][j] + gamma * next_value - values[i][j]
            next_adv = delta + gamma * lam * next_adv
            advantages[i][j] = next_adv
            returns[i][j] = next_adv + values[i][j]
    return advantages, returns


def random_case(b, t, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)  # includes empty rows
    lengths[0] = t  # and at least one full row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    values = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype)
    return values, rewards, mask


def test_gae_by_hand_gamma_1_lam_095():
    values = torch.tensor([[0.5, 1.0, -0.5]], dtype=torch.float64)
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # γ = 1, λ = 0.95, V after the last token = 0:
    # δ2 = 1.0 + 0 − (−0.5) = 1.5          A2 = 1.5
    # δ1 = −0.2 + (−0.5) − 1.0 = −1.7      A1 = −1.7 + 0.95·1.5 = −0.275
    # δ0 = 0.1 + 1.0 − 0.5 = 0.6           A0 = 0.6 + 0.95·(−0.275) = 0.33875
    # Ret = A + V = [0.83875, 0.725, 1.0]
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.33875, -0.275, 1.5]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor([[0.83875, 0.725, 1.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_by_hand_row_ending_early():
    values = torch.tensor([[0.5, 1.0, -0.5], [0.5, 1.0, 123.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.1, -0.2, -77.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # row 1 ends after 2 tokens, so V2 counts as 0:
    # δ1 = −0.2 + 0 − 1.0 = −1.2           A1 = −1.2
    # δ0 = 0.1 + 1.0 − 0.5 = 0.6           A0 = 0.6 + 0.95·(−1.2) = −0.54
    # Ret = [−0.54 + 0.5, −1.2 + 1.0, 0] = [−0.04, −0.2, 0]
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[1], torch.tensor([-0.54, -1.2, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret[1], torch.tensor([-0.04, -0.2, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv[0], torch.tensor([0.33875, -0.275, 1.5], dtype=torch.float64), rtol=0, atol=1e-12)


GAMMA_LAM = {"g1_l095": (1.0, 0.95), "g099_l095": (0.99, 0.95), "g1_l1": (1.0, 1.0), "g09_l0": (0.9, 0.0)}


@pytest.mark.parametrize("gamma, lam", list(GAMMA_LAM.values()), ids=list(GAMMA_LAM))
def test_gae_matches_python_loop_float64(gamma, lam):
    values, rewards, mask = random_case(b=7, t=11, seed=0, dtype=torch.float64)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(values.tolist(), rewards.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


@pytest.mark.parametrize("gamma, lam", list(GAMMA_LAM.values()), ids=list(GAMMA_LAM))
def test_gae_matches_python_loop_float32(gamma, lam):
    values, rewards, mask = random_case(b=9, t=16, seed=1, dtype=torch.float32)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    ref_adv, ref_ret = gae_loop(values.double().tolist(), rewards.double().tolist(), mask.tolist(), gamma, lam)
    for out, ref in ((adv, torch.tensor(ref_adv, dtype=torch.float64)), (ret, torch.tensor(ref_ret, dtype=torch.float64))):
        # relative to the largest magnitude: float32 rounding over a 16-step recursion
        rel_err = (out.double() - ref).abs().max() / ref.abs().max()
        assert rel_err <= 1e-6, rel_err


GARBAGE = {"large": 1e6, "nan": float("nan"), "inf": float("inf")}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_gae_padding_values_and_rewards_do_not_affect_real_tokens(garbage):
    values, rewards, mask = random_case(b=6, t=8, seed=2, dtype=torch.float64)
    adv, ret = gae(values, rewards, mask, gamma=0.99, lam=0.95)
    fill = torch.full_like(values, garbage)
    adv_g, ret_g = gae(torch.where(mask, values, fill), torch.where(mask, rewards, -fill), mask, gamma=0.99, lam=0.95)
    assert torch.equal(adv, adv_g)
    assert torch.equal(ret, ret_g)
    assert torch.equal(adv_g[~mask], torch.zeros_like(adv_g[~mask]))


def test_gae_outputs_are_detached():
    values, rewards, mask = random_case(b=2, t=3, seed=3, dtype=torch.float64)
    adv, ret = gae(values.requires_grad_(True), rewards, mask, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_rejects_left_padding_and_shape_mismatch():
    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="right-padded"):
        gae(values, values, torch.tensor([[False, True, True], [True, True, True]]), 1.0, 0.95)
    with pytest.raises(ValueError, match="same shape"):
        gae(values, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool), 1.0, 0.95)
