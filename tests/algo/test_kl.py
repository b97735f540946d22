"""KL estimators and KL-coefficient controllers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlora.algo import AdaptiveKLController, FixedKLController, kl_k1, kl_k3, make_kl_controller

F64 = torch.float64


def test_k1_and_k3_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)], dtype=F64)
    ref = torch.tensor([math.log(0.25), math.log(0.2)], dtype=F64)
    # k1 = log 0.5 − log 0.25 = log 2 = 0.693147; equal probabilities -> 0
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([math.log(2.0), 0.0], dtype=F64), rtol=0, atol=1e-15)
    # k3 with r = 0.25 / 0.5 = 0.5: (0.5 − 1) − log 0.5 = −0.5 + 0.693147 = 0.193147; r = 1 -> 0 exactly
    k3 = kl_k3(logp, ref)
    assert k3[0].item() == pytest.approx(-0.5 + math.log(2.0), abs=1e-15)
    assert k3[1].item() == 0.0


def test_k1_and_k3_are_unbiased_over_the_whole_distribution():
    # E_{x~p}[k] = Σ_x p(x) k(x) must equal KL(p ‖ q) exactly, for k1 and k3 alike
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=F64)
    kl = (p * (p.log() - q.log())).sum()
    assert (p * kl_k1(p.log(), q.log())).sum().item() == pytest.approx(kl.item(), abs=1e-15)
    assert (p * kl_k3(p.log(), q.log())).sum().item() == pytest.approx(kl.item(), abs=1e-15)
    assert bool((kl_k3(p.log(), q.log()) >= 0).all())


# ---- controllers ----


def test_adaptive_controller_by_hand_with_clipping():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # n = 128, K = 128 / 10000 = 0.0128
    # KL 12:  e = clip(12/6 − 1 = 1, ±0.2) = 0.2     β = 0.1 · (1 + 0.2·0.0128) = 0.100256
    # KL 0:   e = clip(−1, ±0.2) = −0.2             β = 0.100256 · 0.99744 = 0.09999934464
    # KL 6.6: e = 0.1 (not clipped)                 β = 0.09999934464 · 1.00128 = 0.1001273438011
    # KL 5.7: e = −0.05                             β = 0.1001273438011 · 0.99936 = 0.1000632623011
    expected = [0.100256, 0.09999934464, 0.1001273438011, 0.1000632623011]
    for kl, beta in zip([12.0, 0.0, 6.6, 5.7], expected):
        ctl.update(kl, n_steps=128)
        assert ctl.value == pytest.approx(beta, rel=1e-12)


@pytest.mark.parametrize("kls", [[0.5, 30.0, 3.1, 2.9, 100.0], [7.0] * 5], ids=["varied", "constant_above"])
def test_adaptive_controller_matches_the_formula(kls):
    ctl = AdaptiveKLController(init_kl_coef=0.05, target=3.0, horizon=1000)
    beta = 0.05
    for kl in kls:
        ctl.update(torch.tensor(kl, dtype=F64), n_steps=64)  # a 0-dim tensor is accepted too
        e = min(max(kl / 3.0 - 1.0, -0.2), 0.2)  # Ziegler et al. 2019 §2.2
        beta *= 1 + e * 64 / 1000
        assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_fixed_controller_does_not_move():
    ctl = FixedKLController(0.02)
    for kl in [0.0, 1.0, 1e6, -5.0]:
        ctl.update(kl, n_steps=128)
    assert ctl.value == 0.02


@pytest.mark.parametrize(
    "make",
    [lambda: FixedKLController(0.3), lambda: AdaptiveKLController(0.3, 6.0, 500)],
    ids=["fixed", "adaptive"],
)
def test_controller_state_dict_round_trips_through_json(make):
    a = make()
    a.update(10.0, 100)
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    a.update(1.0, 50)
    b.update(1.0, 50)
    assert a.value == b.value


def test_make_kl_controller():
    fixed = make_kl_controller(0.001, None, 10000)
    adaptive = make_kl_controller(0.001, 6.0, 10000)
    assert type(fixed) is FixedKLController and fixed.value == 0.001
    assert type(adaptive) is AdaptiveKLController and (adaptive.value, adaptive.target) == (0.001, 6.0)


@pytest.mark.parametrize(
    "target, horizon", [(0.0, 100), (-1.0, 100), (6.0, 0)], ids=["zero_target", "neg_target", "zero_horizon"]
)
def test_adaptive_controller_rejects_bad_settings(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target, horizon)


def test_adaptive_controller_rejects_nan_kl():
    with pytest.raises(ValueError, match="non-finite"):
        AdaptiveKLController(0.1, 6.0, 100).update(float("nan"), 10)
