"""Reward shaping: per-token KL penalty plus the reward model's scores.

Notation: `b` batch, `t` time (response tokens). `response_mask` (b, t) is True on real
response tokens (EOS included, when generated), a prefix of each row; padding follows.
"""

from __future__ import annotations

import math

import torch

from rlora.algo.kl import kl_k1, kl_k3
from rlora.algo.masked import RunningMoments, check_right_padded, masked_mean, masked_sum, zero_padding

__all__ = ["token_rewards", "scale_and_clip_scores"]

SCALE_REWARD_MODES = ("ignored", "running", "ref")


def token_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    scores: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token rewards `r_t = −β (log π_t − log π_ref_t)` plus the scores.

    KL-penalised reward of Ziegler et al. 2019, §2.2 (`R(x, y) = r(x, y) − β log π/ρ`), spread
    per token as in trlx / Stiennon et al. 2020 eq. 1. `scores` is either
      - (b,): a terminal score, added at the last real response token of each row
        (index `response_mask.sum(1) − 1`, the EOS when one was generated), never at padding;
        a row without real tokens raises `ValueError`; or
      - (b, t): dense scores aligned from the first response token, kept on real tokens only.
    Rewards are 0 at padding. One device sync (the right-padding / empty-row checks).

    Stats (detached 0-dim tensors): `kl` mean over rows of the per-row KL sum (k1, the
    estimator inside the penalty; use it for the KL controller), `kl_per_token` masked mean
    of k1, `kl_k3` mean over rows of the per-row k3 sum (non-negative, lower variance,
    for logging), `non_score_reward` mean over rows of the per-row sum of `−β k1`.

    Shape: logprobs, ref_logprobs, response_mask (b, t); scores (b,) or (b, t)
        -> rewards (b, t).
    """
    if not (logprobs.shape == ref_logprobs.shape == response_mask.shape) or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must all have the same shape (b, t)"
        )
    check_right_padded(response_mask)
    logprobs, ref_logprobs = logprobs.detach(), ref_logprobs.detach()
    kl = zero_padding(kl_k1(logprobs, ref_logprobs), response_mask)  # (b, t)
    non_score = -kl_coef * kl  # (b, t), Ziegler et al. 2019 §2.2: −β log(π/π_ref)
    scores = scores.detach().to(non_score.dtype)
    if scores.shape == response_mask.shape[:1]:
        lengths = response_mask.sum(1)  # (b,)
        if bool((lengths == 0).any()):
            row = int((lengths == 0).nonzero()[0, 0])
            raise ValueError(
                f"row {row} has no real response token, so its terminal score has nowhere to go; "
                "keep at least one token (the EOS) in every response"
            )
        last = (lengths - 1).unsqueeze(1)  # (b, 1)
        rewards = non_score.scatter_add(1, last, scores.unsqueeze(1))  # (b, t), score at the last real token
    elif scores.shape == response_mask.shape:
        rewards = non_score + zero_padding(scores, response_mask)  # (b, t), dense from the first token
    else:
        raise ValueError(
            f"scores have shape {tuple(scores.shape)}; expected (b,) = {tuple(response_mask.shape[:1])} "
            f"for terminal scores or (b, t) = {tuple(response_mask.shape)} for dense scores"
        )
    stats = {
        "kl": kl.sum(1).mean(),
        "kl_per_token": masked_mean(kl, response_mask),
        "kl_k3": masked_sum(kl_k3(logprobs, ref_logprobs), response_mask, dim=1).mean(),
        "non_score_reward": non_score.sum(1).mean(),
    }
    return rewards, stats


def scale_and_clip_scores(
    scores: torch.Tensor,
    scale_reward: str | None,
    running: RunningMoments | None,
    ref_std: float | None,
    cliprange_reward: float | None,
) -> torch.Tensor:
    """Scale then clip scores, in trlx's order (`make_experience`).

    1. Divide by `running.std` (`"running"`), by `ref_std` (`"ref"`), or nothing
       (`"ignored"` / None). The caller updates `running` with the per-sample reward sums
       first; this function does not mutate it. A std of 0 (all rewards so far identical)
       leaves the scores unscaled instead of dividing by zero.
    2. Clip to `[−cliprange_reward, cliprange_reward]`; no clip when it is None or 0.
    Dense scores (b, t) are divided by the same scalar and clipped element-wise.

    Shape: scores (b,) or (b, t) -> same shape.
    """
    if scale_reward in (None, "ignored"):
        std = 1.0
    elif scale_reward == "running":
        if running is None:
            raise ValueError("scale_reward='running' needs a RunningMoments; pass running=RunningMoments()")
        std = running.std
    elif scale_reward == "ref":
        if ref_std is None:
            raise ValueError("scale_reward='ref' needs ref_std; set method.ref_std or compute it from the first rollout")
        std = float(ref_std)
    else:
        raise ValueError(f"scale_reward={scale_reward!r} is not one of {SCALE_REWARD_MODES} (or None)")
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"reward std for scale_reward={scale_reward!r} is {std}; it must be a finite number >= 0")
    if std > 0:
        scores = scores / std
    if cliprange_reward:
        scores = scores.clamp(-cliprange_reward, cliprange_reward)
    return scores
