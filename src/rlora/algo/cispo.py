"""CISPO's token loss (MiniMax-M1, Chen et al. 2025, arXiv 2506.13585, eq. 4): the importance
weight is clipped and detached, so every token keeps a gradient, instead of PPO's clipped
surrogate, which zeroes the gradient of tokens outside the clip range.

`ℓ_t = −sg(min(ρ_t, ε_max)) · A · log π_θ(o_t)`, summed over the optimizer step's real tokens
and divided by their number (as DAPO aggregates). `ε_max` is TRL's `epsilon_high` for
`loss_type="cispo"`: an absolute bound on the weight, 5.0 in ScaleRL (Khatri et al. 2025,
arXiv 2510.13786), not a distance from 1.

Notation: `n` completions, `t` response tokens, `ρ = π_θ / π_old`.
"""

from __future__ import annotations

import torch

from rlora.algo.group import log_importance_weights
from rlora.algo.masked import token_mean, zero_padding


def cispo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     loss_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                     level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token CISPO losses and the fraction of real tokens whose weight was clipped (those
    with a positive advantage and ρ above `epsilon_high`, TRL's `cispo_clip_ratio`).

    `epsilon` (the lower clip of the other loss types) does not apply: CISPO bounds the weight
    from above only. `level="sequence"` uses each completion's length-normalised sequence ratio
    as the weight of its every token (GSPO's). Shape: logprobs, old_logprobs, loss_mask (n, t),
    advantages (n,) or (n, t) -> ℓ (n, t), 0 on padding.
    """
    if epsilon_high is None:
        raise ValueError("loss_type='cispo' needs epsilon_high, the bound on the importance weight (ScaleRL: 5.0)")
    weight = torch.exp(log_importance_weights(logprobs, old_logprobs, loss_mask, level)).detach()  # (n, t)
    adv = advantages[:, None].expand_as(weight) if advantages.dim() == 1 else advantages
    loss = zero_padding(-torch.clamp(weight, max=epsilon_high) * adv * logprobs, loss_mask)
    clipped = (weight > epsilon_high) & (adv > 0)
    return loss, {"clip_ratio/low_mean": torch.zeros((), device=loss.device),
                  "clip_ratio/high_mean": token_mean(clipped.float(), loss_mask)}
