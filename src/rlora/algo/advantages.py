"""Generalized advantage estimation over right-padded responses.

Notation: `b` batch, `t` time (response tokens). `response_mask` (b, t) is True on real
response tokens (EOS included), a prefix of each row; padding follows.
"""

from __future__ import annotations

import torch

from rlora.algo.masked import check_right_padded, zero_padding

__all__ = ["gae"]


def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(γ, λ), Schulman et al. 2016 ("High-Dimensional Continuous
    Control Using Generalized Advantage Estimation"), §3 eq. 11–16.

    The episode ends at the last real token of each row: the value after it is 0 and the
    advantage after it is 0, so padding (values, rewards, even nan) never reaches a real
    token. Outputs are 0 at padding. Advantages are *not* whitened here; whiten them with
    `masked_whiten` (returns are built from the raw advantages, as trlx). Inputs are
    detached: this is rollout bookkeeping, not part of the graph.

    Raises `ValueError` if `response_mask` is not right-padded (one device sync).

    Shape: values, rewards, response_mask (b, t) -> advantages (b, t), returns (b, t).
    """
    if not (values.shape == rewards.shape == response_mask.shape) or values.dim() != 2:
        raise ValueError(
            f"values {tuple(values.shape)}, rewards {tuple(rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must all have the same shape (b, t)"
        )
    check_right_padded(response_mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = zero_padding(values.detach(), response_mask)  # (b, t), V = 0 after the last real token
    rewards = zero_padding(rewards.detach().to(values.dtype), response_mask)  # (b, t)

    n_t = values.shape[1]
    advantages = torch.zeros_like(values)  # (b, t)
    next_value = torch.zeros_like(values[:, 0])  # (b,) V_{t+1}, 0 past the end
    next_adv = torch.zeros_like(values[:, 0])  # (b,) A_{t+1}, 0 past the end
    for t in reversed(range(n_t)):
        # δ_t = r_t + γ V_{t+1} − V_t        (Schulman et al. 2016, §3, δ^V definition)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = δ_t + γλ A_{t+1}, i.e. A_t = Σ_l (γλ)^l δ_{t+l}   (Schulman et al. 2016, eq. 16)
        adv = torch.where(response_mask[:, t], delta + gamma * lam * next_adv, zero)
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    returns = advantages + values  # (b, t), Ret = A + V (the λ-return); both are 0 at padding
    return advantages, returns
