"""The group methods' loss types, one table: each is a per-token objective and the aggregation
of its sum (`rlora.algo.group.aggregate_loss`). A new loss type is a pure per-token function in
its own module and one row here; the method object and the loop take it from the table.

| loss_type | per-token objective | divided by | source |
|---|---|---|---|
| grpo | PPO's clipped surrogate | each completion's length, then the mean over completions | Shao et al. 2024 |
| bnpo | PPO's clipped surrogate | the microbatch's real tokens; weighted by its share of them, the step's on each process | TRL |
| dr_grpo | PPO's clipped surrogate | completions × max_new_tokens | Liu et al. 2025 |
| dapo | PPO's clipped surrogate (clip-higher) | the optimizer step's real tokens | Yu et al. 2025 |
| cispo | the clipped, detached importance weight × A × log π | the optimizer step's real tokens | Chen et al. 2025 |

Notation: `n` completions, `t` response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlora.algo.cispo import cispo_token_loss
from rlora.algo.group import aggregate_loss, clipped_token_loss, log_importance_weights
from rlora.algo.kl import kl_k3
from rlora.algo.masked import token_mean, zero_padding


@dataclass(frozen=True)
class LossType:
    """A group loss: its per-token objective `token_loss(logprobs, old_logprobs, advantages,
    loss_mask, epsilon, epsilon_high, level) -> (ℓ (n, t), stats)` and the `aggregate_loss`
    rule its sum follows ("grpo", "bnpo", "dr_grpo" or "dapo")."""

    token_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    aggregation: str

    @property
    def divides_by_step_tokens(self) -> bool:
        """Whether a microbatch's loss is divided by the whole optimizer step's real tokens."""
        return self.aggregation == "dapo"

    @property
    def divides_by_tokens(self) -> bool:
        """Whether a microbatch's loss is a mean over its own real tokens (else over its rows)."""
        return self.aggregation == "bnpo"


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(clipped_token_loss, "grpo"),
    "bnpo": LossType(clipped_token_loss, "bnpo"),
    "dr_grpo": LossType(clipped_token_loss, "dr_grpo"),
    "dapo": LossType(clipped_token_loss, "dapo"),
    "cispo": LossType(cispo_token_loss, "dapo"),
}


def group_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               loss_mask: torch.Tensor, *, loss_type: str, epsilon: float, epsilon_high: float | None, level: str,
               max_completion_length: int, beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
               step_tokens: float | None = None, kl_bias_correction: bool = False
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A group method's loss of one microbatch: `loss_type`'s per-token objective plus `beta · k3`
    to the reference (GRPO, Shao et al. 2024, eq. 3), aggregated by its rule. With
    `kl_bias_correction` the k3 term is weighted by the importance ratio ρ (with its gradient), an
    estimate of the KL that stays unbiased when the samples came from an older policy (TRL's
    `use_bias_correction_kl`).

    Returns the loss and detached stats: clip fractions, the ratio's mean (1 on the first
    minibatch of a phase) and `kl` (mean k3 per real token) when `beta > 0`; each a mean over the
    loss's tokens counting at least one, so a microbatch without any gives 0, not nan.
    Shape: logprobs, old_logprobs, loss_mask (n, t), advantages (n,) or (n, t) -> ().
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    kind = LOSS_TYPES[loss_type]
    per_token, stats = kind.token_loss(logprobs, old_logprobs, advantages, loss_mask, epsilon, epsilon_high, level)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference log-probs (ref_logprobs)")
        kl = zero_padding(kl_k3(logprobs, ref_logprobs), loss_mask)
        stats["kl"] = token_mean(kl.detach(), loss_mask)
        if kl_bias_correction:
            kl = kl * torch.exp(log_importance_weights(logprobs, old_logprobs, loss_mask, level))
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, loss_mask, kind.aggregation, max_completion_length, step_tokens)
    with torch.no_grad():
        stats["policy/ratio_mean"] = token_mean(torch.exp(logprobs - old_logprobs), loss_mask)
        stats["clip_ratio/region_mean"] = stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]
    return loss, stats
