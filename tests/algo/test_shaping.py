"""Per-token rewards (KL penalty + scores) and score scaling/clipping."""

from __future__ import annotations

import math

import pytest
import torch

from rlora.algo import RunningMoments, scale_and_clip_scores, token_rewards

NAN = float("nan")
F64 = torch.float64

# Row 0 has 3 real tokens (the last one the EOS), row 1 one; padding holds garbage.
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5, NAN], [-0.3, NAN, 5.0, -9.0]], dtype=F64)
REF = torch.tensor([[-1.5, -1.0, -0.5, 7.0], [-0.1, 3.0, NAN, NAN]], dtype=F64)
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])
BETA = 0.1
# k1 = logπ − logπ_ref: row 0 [0.5, −1.0, 0.0], row 1 [−0.2]
# −β k1:                row 0 [−0.05, 0.1, −0.0], row 1 [0.02]


def test_terminal_score_lands_on_last_real_token_by_hand():
    rewards, _ = token_rewards(LOGPROBS, REF, MASK, BETA, torch.tensor([1.0, 2.0], dtype=F64))
    # row 0: score 1.0 at index 2 (the EOS): [−0.05, 0.1, 0 + 1.0, 0]; row 1: [0.02 + 2.0, 0, 0, 0]
    expected = torch.tensor([[-0.05, 0.1, 1.0, 0.0], [2.02, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)


def test_dense_scores_by_hand():
    scores = torch.tensor([[0.1, 0.2, 0.3, 99.0], [0.4, NAN, NAN, NAN]], dtype=F64)
    rewards, _ = token_rewards(LOGPROBS, REF, MASK, BETA, scores)
    # row 0: [−0.05 + 0.1, 0.1 + 0.2, 0 + 0.3, pad]; row 1: [0.02 + 0.4, pad, pad, pad]
    expected = torch.tensor([[0.05, 0.3, 0.3, 0.0], [0.42, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)


def test_reward_stats_by_hand():
    _, stats = token_rewards(LOGPROBS, REF, MASK, BETA, torch.tensor([1.0, 2.0], dtype=F64))
    # kl: per-row sums −0.5 and −0.2, mean −0.35; per token: (0.5 − 1 + 0 − 0.2) / 4 = −0.175
    # non_score_reward: per-row sums 0.05 and 0.02, mean 0.035
    # kl_k3 = e^d − 1 − d, d = ref − logp: row 0 d = [−0.5, 1, 0] -> 0.1065307 + 0.7182818 + 0;
    #   row 1 d = [0.2] -> 0.0214028; mean of row sums (0.8248125 + 0.0214028) / 2 = 0.4231076
    expected = {"kl": -0.35, "kl_per_token": -0.175, "non_score_reward": 0.035, "kl_k3": 0.42310762}
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].dim() == 0 and not stats[key].requires_grad
        assert stats[key].item() == pytest.approx(value, abs=1e-8), key


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_terminal_score_never_on_padding(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 8, 6
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    garbage = torch.full((b, t), NAN, dtype=F64)
    logprobs = torch.where(mask, -torch.rand(b, t, generator=g, dtype=F64), garbage)
    ref = torch.where(mask, -torch.rand(b, t, generator=g, dtype=F64), -garbage)
    scores = torch.randn(b, generator=g, dtype=F64)
    rewards, _ = token_rewards(logprobs, ref, mask, 0.05, scores)
    kl_only, _ = token_rewards(logprobs, ref, mask, 0.05, torch.zeros(b, dtype=F64))
    assert torch.equal(rewards[~mask], torch.zeros_like(rewards[~mask]))
    # the score is the only difference, one-hot at index length − 1 (a plain loop over rows)
    for row in range(b):
        diff = (rewards[row] - kl_only[row]).tolist()
        last = int(lengths[row]) - 1
        for j in range(t):
            assert diff[j] == pytest.approx(scores[row].item() if j == last else 0.0, abs=1e-12)
    assert torch.equal(kl_only[mask], -0.05 * (logprobs - ref)[mask])


def test_terminal_score_on_a_row_without_tokens_raises():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="row 1 has no real response token"):
        token_rewards(torch.zeros(2, 2), torch.zeros(2, 2), mask, 0.1, torch.ones(2))


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 4, 1)], ids=["wrong_b", "wrong_t", "3d"])
def test_scores_of_the_wrong_shape_raise(shape):
    with pytest.raises(ValueError, match="scores have shape"):
        token_rewards(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), 0.1, torch.ones(shape))


def test_left_padded_mask_raises():
    mask = torch.tensor([[False, True], [True, True]])
    with pytest.raises(ValueError, match="right-padded"):
        token_rewards(torch.zeros(2, 2), torch.zeros(2, 2), mask, 0.1, torch.ones(2))


# ---- scale_and_clip_scores ----


def running_with_std_2() -> RunningMoments:
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 3.0, 5.0]))  # mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    assert moments.std == pytest.approx(2.0, abs=1e-15)
    return moments


SCORES = torch.tensor([-30.0, -1.0, 4.0, 50.0])
SCALE_CASES = {
    # mode, ref_std, cliprange, expected
    "ignored_noclip": ("ignored", None, None, [-30.0, -1.0, 4.0, 50.0]),
    "none_clip10": (None, None, 10.0, [-10.0, -1.0, 4.0, 10.0]),
    "ignored_clip0_is_noclip": ("ignored", None, 0, [-30.0, -1.0, 4.0, 50.0]),
    # divide by running std 2 then clip to ±10: [−15, −0.5, 2, 25] -> [−10, −0.5, 2, 10]
    "running_clip10": ("running", None, 10.0, [-10.0, -0.5, 2.0, 10.0]),
    # divide by ref_std 4 then clip to ±10: [−7.5, −0.25, 1, 12.5] -> [−7.5, −0.25, 1, 10]
    "ref_clip10": ("ref", 4.0, 10.0, [-7.5, -0.25, 1.0, 10.0]),
    "ref_noclip": ("ref", 4.0, None, [-7.5, -0.25, 1.0, 12.5]),
    # std 0 (all rewards identical) leaves the scores unscaled
    "ref_std0": ("ref", 0.0, 10.0, [-10.0, -1.0, 4.0, 10.0]),
}


@pytest.mark.parametrize("mode, ref_std, clip, expected", list(SCALE_CASES.values()), ids=list(SCALE_CASES))
def test_scale_and_clip_scores_modes(mode, ref_std, clip, expected):
    out = scale_and_clip_scores(SCORES, mode, running_with_std_2(), ref_std, clip)
    assert out.tolist() == expected


def test_scale_and_clip_dense_scores_use_the_same_scalar():
    dense = torch.tensor([[8.0, -30.0], [2.0, 0.5]])
    # divide by running std 2: [[4, −15], [1, 0.25]], clip ±10: [[4, −10], [1, 0.25]]
    out = scale_and_clip_scores(dense, "running", running_with_std_2(), None, 10.0)
    assert out.tolist() == [[4.0, -10.0], [1.0, 0.25]]


def test_scale_and_clip_does_not_mutate_running():
    moments = running_with_std_2()
    before = moments.state_dict()
    scale_and_clip_scores(SCORES, "running", moments, None, 10.0)
    assert moments.state_dict() == before


@pytest.mark.parametrize(
    "mode, running, ref_std, match",
    [
        ("ref", None, None, "needs ref_std"),
        ("running", None, None, "needs a RunningMoments"),
        ("whiten", None, None, "not one of"),
        ("ref", None, -1.0, "finite number"),
        ("ref", None, math.inf, "finite number"),
    ],
    ids=["ref_without_std", "running_without_moments", "unknown_mode", "negative_std", "inf_std"],
)
def test_scale_and_clip_errors(mode, running, ref_std, match):
    with pytest.raises(ValueError, match=match):
        scale_and_clip_scores(SCORES, mode, running, ref_std, 10.0)
