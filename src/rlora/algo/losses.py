"""PPO's clipped policy loss and clipped value loss.

Notation: `b` batch, `t` time (response tokens). `response_mask` (b, t) is True on real
response tokens. Losses are token-level masked means over the (micro)batch, as trlx.
Statistics are detached 0-dim tensors, never `.item()`-ed here: the trainer reduces them
once per step, so these functions never synchronise with the device. Padding is selected
away before any arithmetic, so garbage (even nan) there reaches neither loss, statistics,
nor gradients.
"""

from __future__ import annotations

import torch

from rlora.algo.masked import masked_mean, zero_padding

__all__ = ["policy_loss", "value_loss"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, Schulman et al. 2017 ("Proximal Policy Optimization
    Algorithms"), eq. 7, as a loss to minimise:
    `L = masked_mean(max(−Â ρ, −Â clip(ρ, 1 − ε, 1 + ε)))`, `ρ = exp(log π − log π_old)`.

    Stats: `policy_loss`, `approx_kl` (masked mean of (ρ − 1) − log ρ), `clipfrac` (masked
    fraction of tokens where the clipped term is the larger, i.e. active), `ratio_mean`,
    `ratio_max_abs_dev` (max |ρ − 1| over real tokens).

    Shape: logprobs, old_logprobs, advantages, response_mask (b, t) -> loss ().
    """
    log_ratio = zero_padding(logprobs - old_logprobs.detach(), response_mask)  # (b, t)
    advantages = zero_padding(advantages.detach(), response_mask)  # (b, t)
    ratio = torch.exp(log_ratio)  # (b, t), ρ = π_θ / π_old
    pg_unclipped = -advantages * ratio  # Schulman et al. 2017 eq. 7, −Â ρ
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # eq. 7, −Â clip(ρ, 1±ε)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), response_mask)  # eq. 7 (max of negated = −min)

    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            # Schulman 2020 "Approximating KL Divergence", k3 with r = ρ
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(ratio.dtype), response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max_abs_dev": zero_padding((ratio - 1.0).abs(), response_mask).amax(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of OpenAI baselines `ppo2` (Dhariwal et al. 2017), as trlx:
    `½ masked_mean(max((V − Ret)², (clip(V, V_old − ε_v, V_old + ε_v) − Ret)²))`.

    Stats: `value_loss`, `clipfrac` (masked fraction of tokens where the clipped error is
    the larger), `values_mean` (masked mean of V), `values_error` (masked mean of (V − Ret)²).

    Shape: values, old_values, returns, response_mask (b, t) -> loss ().
    """
    values = zero_padding(values, response_mask)  # (b, t)
    old_values = zero_padding(old_values.detach(), response_mask)  # (b, t)
    returns = zero_padding(returns.detach(), response_mask)  # (b, t)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_unclipped = (values - returns) ** 2  # baselines ppo2: (V − Ret)²
    vf_clipped = (values_clipped - returns) ** 2  # baselines ppo2: (clip(V, V_old ± ε_v) − Ret)²
    loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), response_mask)

    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "clipfrac": masked_mean((vf_clipped > vf_unclipped).to(values.dtype), response_mask),
            "values_mean": masked_mean(values, response_mask),
            "values_error": masked_mean(vf_unclipped, response_mask),
        }
    return loss, stats
