"""PPO policy and value losses, and logprobs/entropy from logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlora.algo import logprobs_and_entropy, logprobs_of_labels, masked_mean, policy_loss, value_loss
from rlora.algo import token_entropy

NAN = float("nan")
F64 = torch.float64
POLICY_KEYS = {"policy_loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_max_abs_dev"}
VALUE_KEYS = {"value_loss", "clipfrac", "values_mean", "values_error"}


def ragged_case(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return g, mask


def check_stats(stats, keys):
    assert set(stats) == keys
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key


# ---- policy loss ----


def test_policy_loss_by_hand_clipping_inactive():
    logprobs = torch.tensor([[math.log(1.1), math.log(0.9), 5.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, NAN]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, NAN]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    # ρ = [1.1, 0.9] inside [0.8, 1.2]: −Âρ = [−1.1, 0.9] = −Â clip(ρ); loss = (−1.1 + 0.9) / 2 = −0.1
    # approx_kl = ((0.1 − log 1.1) + (−0.1 − log 0.9)) / 2 = (0.0046898 + 0.0053605) / 2 = 0.0050252
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    check_stats(stats, POLICY_KEYS)
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    assert stats["policy_loss"].item() == pytest.approx(-0.1, abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx((0.1 - math.log(1.1) - 0.1 - math.log(0.9)) / 2, abs=1e-12)
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["ratio_max_abs_dev"].item() == pytest.approx(0.1, abs=1e-12)
    loss.backward()
    # d loss / d logπ = −Âρ / n = [−1.1/2, 0.9/2], 0 at padding
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.55, 0.45, 0.0]], dtype=F64), rtol=0, atol=1e-12)


def test_policy_loss_by_hand_clipping_active():
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 3.0]], dtype=F64)
    logprobs.requires_grad_(True)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, NAN]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1e9]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    # ε = 0.2, clip(ρ) = [1.2, 0.8, 1.2, 0.8]
    # tok 0: ρ 1.5, Â  1: −Âρ = −1.5, −Â clip = −1.2 -> max −1.2 (clip active)
    # tok 1: ρ 0.5, Â −1: −Âρ =  0.5, −Â clip =  0.8 -> max  0.8 (clip active)
    # tok 2: ρ 1.5, Â −1: −Âρ =  1.5, −Â clip =  1.2 -> max  1.5 (not active)
    # tok 3: ρ 0.5, Â  1: −Âρ = −0.5, −Â clip = −0.8 -> max −0.5 (not active)
    # loss = (−1.2 + 0.8 + 1.5 − 0.5) / 4 = 0.15; clipfrac = 2/4
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    check_stats(stats, POLICY_KEYS)
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    assert stats["clipfrac"].item() == 0.5
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["ratio_max_abs_dev"].item() == pytest.approx(0.5, abs=1e-12)
    # approx_kl = 2·((0.5 − log 1.5) + (−0.5 − log 0.5)) / 4
    assert stats["approx_kl"].item() == pytest.approx((-math.log(1.5) - math.log(0.5)) / 2, abs=1e-12)
    loss.backward()
    # clipped tokens get no gradient; the others −Âρ / 4: tok 2: 1.5/4 = 0.375, tok 3: −0.5/4 = −0.125
    expected = torch.tensor([[0.0, 0.0, 0.375, -0.125, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_policy_loss_at_ratio_one(dtype):
    g, mask = ragged_case(5, 7, seed=0)
    old = torch.where(mask, -torch.rand(5, 7, generator=g, dtype=dtype) * 3, torch.full((5, 7), NAN, dtype=dtype))
    adv = torch.where(mask, torch.randn(5, 7, generator=g, dtype=dtype), torch.full((5, 7), 1e9, dtype=dtype))
    loss, stats = policy_loss(old.clone(), old, adv, mask, cliprange=0.2)
    assert torch.equal(loss, -masked_mean(adv, mask))
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0
    assert stats["ratio_max_abs_dev"].item() == 0.0


GARBAGE = {"large": 1e6, "nan": NAN, "inf": float("inf")}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_policy_loss_padding_reaches_neither_loss_stats_nor_grads(garbage):
    g, mask = ragged_case(6, 5, seed=1)
    logprobs = -torch.rand(6, 5, generator=g, dtype=F64)
    old = logprobs + 0.3 * torch.randn(6, 5, generator=g, dtype=F64)
    adv = torch.randn(6, 5, generator=g, dtype=F64)

    grad_g = assert_padding_inert(policy_loss, logprobs, old, adv, mask, garbage, POLICY_KEYS)
    assert torch.equal(grad_g[~mask], torch.zeros_like(grad_g[~mask]))


def assert_padding_inert(loss_fn, x, old, third, mask, garbage, keys) -> torch.Tensor:
    """`loss_fn(x, old, third, mask, 0.2)` gives the same loss, stats and gradient of `x` whether
    padding holds zeros or `garbage` (`old` gets its negation); returns the gradient with garbage."""

    def run(fill):
        pad = torch.full_like(x, fill)
        inp = torch.where(mask, x, pad).requires_grad_(True)
        loss, stats = loss_fn(inp, torch.where(mask, old, -pad), torch.where(mask, third, pad), mask, 0.2)
        loss.backward()
        return loss, stats, inp.grad

    loss, stats, grad = run(0.0)
    loss_g, stats_g, grad_g = run(garbage)
    assert torch.equal(loss, loss_g)
    assert all(torch.equal(stats[k], stats_g[k]) for k in keys)
    assert torch.equal(grad, grad_g)
    return grad_g


# ---- value loss ----

V = torch.tensor([[1.0, 1.0, 0.0, 1.0, 7.0]], dtype=F64)
V_OLD = torch.tensor([[0.5, 0.9, 0.0, 0.0, NAN]], dtype=F64)
RET = torch.tensor([[2.0, 0.0, 0.1, 0.5, NAN]], dtype=F64)
V_MASK = torch.tensor([[True, True, True, True, False]])


def test_value_loss_by_hand_clipped():
    values = V.clone().requires_grad_(True)
    # ε_v = 0.2:
    # tok 0: clip(1.0, 0.3, 0.7) = 0.7:  (1 − 2)² = 1,    (0.7 − 2)² = 1.69 -> 1.69 (clip active)
    # tok 1: clip(1.0, 0.7, 1.1) = 1.0:  (1 − 0)² = 1,    (1 − 0)² = 1      -> 1
    # tok 2: clip(0, −0.2, 0.2) = 0:     (0 − 0.1)² = 0.01 both             -> 0.01
    # tok 3: clip(1.0, −0.2, 0.2) = 0.2: (1 − 0.5)² = 0.25, (0.2 − 0.5)² = 0.09 -> 0.25 (not active)
    # loss = ½ (1.69 + 1 + 0.01 + 0.25) / 4 = ½ · 2.95 / 4 = 0.36875; clipfrac = 1/4
    # values_mean = (1 + 1 + 0 + 1) / 4 = 0.75; values_error = (1 + 1 + 0.01 + 0.25) / 4 = 0.565
    loss, stats = value_loss(values, V_OLD, RET, V_MASK, cliprange_value=0.2)
    check_stats(stats, VALUE_KEYS)
    assert loss.item() == pytest.approx(0.36875, abs=1e-12)
    assert stats["value_loss"].item() == pytest.approx(0.36875, abs=1e-12)
    assert stats["clipfrac"].item() == 0.25
    assert stats["values_mean"].item() == pytest.approx(0.75, abs=1e-12)
    assert stats["values_error"].item() == pytest.approx(0.565, abs=1e-12)
    loss.backward()
    # clipped tok 0 gets no gradient; others ½·2(V − Ret)/4: tok 1: 1/4, tok 2: −0.1/4, tok 3: 0.5/4
    expected = torch.tensor([[0.0, 0.25, -0.025, 0.125, 0.0]], dtype=F64)
    torch.testing.assert_close(values.grad, expected, rtol=0, atol=1e-12)


def test_value_loss_by_hand_unclipped():
    # ε_v = 10 clips nothing: loss = ½ (1 + 1 + 0.01 + 0.25) / 4 = 0.2825
    loss, stats = value_loss(V, V_OLD, RET, V_MASK, cliprange_value=10.0)
    assert loss.item() == pytest.approx(0.2825, abs=1e-12)
    assert stats["clipfrac"].item() == 0.0
    assert stats["values_error"].item() == pytest.approx(0.565, abs=1e-12)


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_value_loss_padding_reaches_neither_loss_stats_nor_grads(garbage):
    g, mask = ragged_case(6, 5, seed=2)
    values, old, ret = (torch.randn(6, 5, generator=g, dtype=F64) for _ in range(3))

    assert_padding_inert(value_loss, values, old, ret, mask, garbage, VALUE_KEYS)


# ---- logprobs_of_labels / logprobs_and_entropy ----


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_logprobs_of_labels_equals_log_softmax_gather(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 6, 50, generator=g, dtype=F64) * 5).to(dtype)
    labels = torch.randint(0, 50, (4, 6), generator=g)
    expected = F.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    out = logprobs_of_labels(logits, labels)
    assert out.shape == (4, 6) and out.dtype == dtype
    # 1e-6 absolute plus 1e-6 relative: log-probs near −20 have a float32 spacing of 1.9e-6
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_logprobs_of_labels_bf16_is_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 40, generator=g) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    expected = F.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    out = logprobs_of_labels(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1 << 22, 50, 120], ids=["one-chunk", "one-row-chunks", "uneven-chunks"])
def test_logprobs_of_labels_gradient_matches_autograd_in_every_chunking(monkeypatch, chunk):
    import rlora.algo.logprobs as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk)  # 50 logits a row: chunks of 1 and of 2 rows
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 7, 50, generator=g, dtype=F64) * 4).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g, dtype=F64)
    (logprobs_of_labels(logits, labels) * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    (F.log_softmax(reference, -1).gather(-1, labels[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: logprobs_of_labels(x, labels[:1, :3]), (logits[:1, :3].detach()
                                                                                      .requires_grad_(),))


@pytest.mark.parametrize("chunk", [1 << 22, 50], ids=["autograd-path", "chunked-function"])
def test_logprobs_of_labels_at_a_temperature_are_those_of_softmax_logits_over_t(monkeypatch, chunk):
    import rlora.algo.logprobs as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 50, generator=g, dtype=F64) * 4).requires_grad_()
    labels = torch.randint(0, 50, (2, 4), generator=g)
    weights = torch.randn(2, 4, generator=g, dtype=F64)
    out = logprobs_of_labels(logits, labels, temperature=0.7)
    (out * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    expected = F.log_softmax(reference / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=1e-12)
    assert not torch.allclose(out, logprobs_of_labels(logits, labels))  # the temperature matters
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        logprobs_of_labels(logits, labels, temperature=0)


@pytest.mark.parametrize("chunk", [1 << 22, 50, 120], ids=["small-autograd-path", "one-row-chunks", "uneven-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logprobs_and_entropy_are_logprobs_of_labels_and_token_entropy(monkeypatch, chunk, dtype):
    import rlora.algo.logprobs as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    logits[0, 1, :10] = -math.inf  # banned tokens: p = 0, and they add nothing to the entropy
    labels = torch.randint(10, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)
    for temperature in (1.0, 0.7):
        fused, plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        logprobs, entropy = logprobs_and_entropy(fused, labels, temperature)
        expected = logprobs_of_labels(plain, labels, temperature)
        assert torch.equal(logprobs, expected)  # the same computation, bitwise
        (logprobs * weights).sum().backward()
        (expected * weights).sum().backward()
        assert torch.equal(fused.grad, plain.grad)
        assert not entropy.requires_grad and entropy.dtype == torch.float32 and entropy.shape == (3, 7)
        z = logits.double() / temperature
        by_hand = -(F.softmax(z, -1) * F.log_softmax(z, -1).nan_to_num(neginf=0.0)).sum(-1)
        torch.testing.assert_close(entropy.double(), by_hand, rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, token_entropy(logits, temperature), rtol=0, atol=1e-5)
    assert torch.isfinite(entropy).all()  # finite with the -inf entries
    broken = logits.clone()
    broken[1, 2, 5] = math.nan  # a diverged update's logit
    broken[2, 3] = -math.inf  # a row with no possible token
    _, entropy = logprobs_and_entropy(broken, labels)
    expected = token_entropy(broken)
    assert expected[1, 2].isnan() and expected[2, 3].isnan()
    assert entropy[1, 2].isnan() and entropy[2, 3].isnan()  # logged as nan, as token_entropy does, never 0
    assert torch.isfinite(entropy[0]).all()


def test_logprobs_of_labels_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="align them first"):
        logprobs_of_labels(torch.zeros(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))
