"""Masked statistics and RunningMoments: hand numbers, numpy references, padding garbage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlora.algo import RunningMoments, check_right_padded, masked_mean, masked_sum, masked_var, masked_whiten

NAN = float("nan")
GARBAGE = {"large": 1e6, "nan": NAN, "inf": float("inf")}


def ragged(b: int, t: int, seed: int, min_len: int = 1) -> torch.Tensor:
    """A right-padded (b, t) bool mask with random lengths in [min_len, t]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, t + 1, (b,), generator=g)
    return torch.arange(t)[None, :] < lengths[:, None]


# ---- masked_sum / masked_mean / masked_var by hand ----

X = torch.tensor([[1.0, 2.0, 100.0], [3.0, NAN, float("inf")]], dtype=torch.float64)
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_by_hand():
    # real values 1, 2, 3: sum 6, mean 6/3 = 2; per row: (1+2)/2 = 1.5 and 3/1 = 3
    assert masked_sum(X, M).item() == 6.0
    assert masked_mean(X, M).item() == 2.0
    assert masked_mean(X, M, dim=1).tolist() == [1.5, 3.0]
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 3.0]


def test_masked_var_by_hand():
    # real values 1, 2, 3, mean 2: squared deviations 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(2 / 3, abs=1e-15)
    assert masked_var(X, M).item() == pytest.approx(1.0, abs=1e-15)


def test_masked_mean_gradient_ignores_nan_padding():
    x = X.clone().requires_grad_(True)
    masked_mean(x, M).backward()
    # d mean / d x = 1/3 on the 3 real tokens, exactly 0 at padding (no nan from 0 * nan)
    assert x.grad.tolist() == [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]


def test_masked_var_single_token_unbiased_raises_biased_is_zero():
    x = torch.tensor([[5.0, 7.0]])
    m = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_var(x, m)
    assert masked_var(x, m, unbiased=False).item() == 0.0


def test_masked_mean_of_empty_mask_is_nan():
    assert math.isnan(masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item())


def test_mask_must_be_bool_with_matching_shape():
    with pytest.raises(TypeError, match="bool"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool))


# ---- masked_whiten ----


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
@pytest.mark.parametrize("shift_mean", [True, False], ids=["shift", "keep_mean"])
def test_masked_whiten_ignores_padding(garbage, shift_mean):
    g = torch.Generator().manual_seed(0)
    mask = ragged(6, 9, seed=1)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 2
    clean = masked_whiten(x, mask, shift_mean=shift_mean)
    dirty = masked_whiten(torch.where(mask, x, torch.full_like(x, garbage)), mask, shift_mean=shift_mean)
    assert torch.equal(clean, dirty)
    assert torch.equal(clean[~mask], torch.zeros_like(clean[~mask]))


def test_masked_whiten_gradient_ignores_nan_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, NAN]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    (masked_whiten(x, mask) * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert x.grad[~mask].tolist() == [0.0, 0.0, 0.0]


def test_masked_whiten_has_mean_0_var_1_over_real_tokens_and_matches_numpy():
    g = torch.Generator().manual_seed(2)
    mask = ragged(5, 7, seed=3)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 4 - 1
    w = masked_whiten(x, mask)
    real = x[mask].numpy()
    expected = (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)  # var / (var + 1e-8)


def test_masked_whiten_keep_mean_adds_the_mean_back():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var 1: whitened (x - 2) / sqrt(1 + 1e-8) ≈ -1, 0, 1; plus mean 2 -> 1, 2, 3
    w = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-8)


def test_masked_whiten_single_real_token_uses_biased_variance():
    # one real token: unbiased variance undefined -> biased variance 0 -> (x - x) / sqrt(eps) = 0
    x = torch.tensor([[4.0, NAN, 1.0]])
    mask = torch.tensor([[True, False, False]])
    assert masked_whiten(x, mask).tolist() == [[0.0, 0.0, 0.0]]
    assert masked_whiten(x, mask, shift_mean=False).tolist() == [[4.0, 0.0, 0.0]]


def test_masked_whiten_empty_mask_gives_zeros():
    x = torch.randn(2, 3)
    assert torch.equal(masked_whiten(x, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3))


# ---- check_right_padded ----


def test_check_right_padded_accepts_prefix_masks():
    check_right_padded(ragged(8, 5, seed=4, min_len=0))


def test_check_right_padded_rejects_a_gap():
    mask = torch.tensor([[True, True, False], [True, False, True]])
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        check_right_padded(mask)


# ---- RunningMoments ----

BATCH_SIZES = {"equal": [16, 16, 16], "ragged": [3, 50, 7, 1, 20], "one_batch": [40], "singletons": [1, 1, 1, 1]}


@pytest.mark.parametrize("sizes", list(BATCH_SIZES.values()), ids=list(BATCH_SIZES))
def test_running_moments_match_numpy_over_the_concatenation(sizes):
    rng = np.random.default_rng(5)
    batches = [rng.normal(loc=3.0, scale=2.0, size=n) for n in sizes]
    moments = RunningMoments()
    for batch in batches:
        batch_mean, batch_std = moments.update(torch.tensor(batch, dtype=torch.float32))
        batch32 = np.asarray(batch, dtype=np.float32).astype(np.float64)
        assert batch_mean == pytest.approx(batch32.mean(), abs=1e-6)
        if len(batch) > 1:
            assert batch_std == pytest.approx(batch32.std(ddof=1), abs=1e-6)
        else:
            assert math.isnan(batch_std)  # the std of one sample is undefined
    seen = np.concatenate([np.asarray(b, dtype=np.float32).astype(np.float64) for b in batches])
    assert moments.count == len(seen)
    assert moments.mean == pytest.approx(seen.mean(), abs=1e-6)
    assert moments.std == pytest.approx(seen.std(ddof=1), abs=1e-6)


def test_running_moments_std_is_1_until_two_values():
    moments = RunningMoments()
    assert moments.std == 1.0
    moments.update(torch.tensor([7.0]))
    assert (moments.mean, moments.std) == (7.0, 1.0)
    moments.update(torch.tensor([9.0]))
    # values 7, 9: mean 8, unbiased var ((1)^2 + (1)^2) / 1 = 2
    assert moments.mean == 8.0
    assert moments.std == pytest.approx(math.sqrt(2.0), abs=1e-15)


def test_running_moments_state_dict_round_trips_through_json():
    a = RunningMoments()
    a.update(torch.tensor([1.0, 2.0, 4.0]))
    a.update(torch.tensor([-3.0, 0.5]))
    state = json.loads(json.dumps(a.state_dict()))
    b = RunningMoments()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    nxt = torch.tensor([10.0, 11.0, -2.0])
    assert a.update(nxt) == b.update(nxt)
    assert (a.mean, a.std, a.count) == (b.mean, b.std, b.count)


@pytest.mark.parametrize(
    "xs", [torch.tensor([]), torch.tensor([1.0, float("nan")])], ids=["empty", "nan"]
)
def test_running_moments_rejects_bad_batches(xs):
    with pytest.raises(ValueError):
        RunningMoments().update(xs)


def test_masked_whiten_with_given_moments_uses_them():
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 9.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    own = (masked_mean(x, mask), masked_var(x, mask))
    torch.testing.assert_close(masked_whiten(x, mask, moments=own), masked_whiten(x, mask), rtol=0, atol=1e-12)
    other = masked_whiten(x, mask, moments=(torch.tensor(0.0), torch.tensor(4.0)))
    torch.testing.assert_close(other[mask], x[mask] / (4.0 + 1e-8) ** 0.5, rtol=0, atol=1e-12)
    assert (other[~mask] == 0).all()
