"""Critic-free group methods as pure functions: group advantages, the clipped token loss (token or
sequence ratio), DAPO's overlong shaping and the loss aggregations. A loss type pairs a token loss
with an aggregation, and adds the k3 KL penalty (`rlora.algo.loss_types`).

Each formula cites its source at the line. REINFORCE++'s returns are `rlora.algo.gae` with V = 0
and λ = 1 over `rlora.algo.token_rewards`.

Notation: `n` completions = `n / G` prompts × `G` completions each (`num_generations`; groups
contiguous), `t` response tokens, `A` advantages, `ρ = π_θ / π_old`. `loss_mask` (n, t) is True
on the real response tokens that count in the loss (`response_mask`, less the truncated
completions with `mask_truncated_completions`); padding is cleared with `zero_padding`.
"""

from __future__ import annotations

import torch

from rlora.algo.masked import masked_sum, token_mean, zero_padding

ESTIMATORS = ("grpo", "rloo", "reinforce++", "reinforce++_baseline")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")  # how a loss type adds up its tokens (algo.loss_types)
STD_EPS = 1e-4  # TRL's grpo_trainer.py: (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, num_generations: int, estimator: str = "grpo",
                     scale_rewards: str = "group") -> torch.Tensor:
    """One advantage per completion from its group's rewards.

    - grpo (Shao et al. 2024, eq. 3; TRL): `(r_i − mean_G) / (std_G + 1e-4)` with `scale_rewards`
      "group" (unbiased std within the group), "batch" (std over all `n` rewards) or "none"
      (Dr.GRPO, Liu et al. 2025: `r_i − mean_G`).
    - rloo (Ahmadian et al. 2024, eq. 6): `r_i − (1 / (G − 1)) Σ_{j≠i} r_j`, unscaled.
    - reinforce++_baseline (Hu 2025; OpenRLHF): `r_i − mean_G`; the batch whitening of
      REINFORCE++ follows over tokens (`rlora.algo.masked_whiten`), not here.
    - reinforce++: `r_i` itself (no baseline; whitened over the batch afterwards).
    A group of G equal rewards gets advantages 0 (never NaN). A NaN reward (a completion no reward
    function judged) is left out of its group's mean, std and leave-one-out baseline, and gets
    advantage 0, as TRL's nan-aware statistics do (`_nan_group_advantages`).
    Shape: rewards (n,) -> (n,).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage_estimator={estimator!r} is not one of {ESTIMATORS}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not make whole groups of num_generations={num_generations}")
    if estimator == "rloo" and num_generations < 2:
        raise ValueError("rloo needs num_generations >= 2: the baseline is the mean of the other completions")
    grouped = rewards.reshape(-1, num_generations).double()  # (n / G, G)
    if torch.isnan(grouped).any():
        return _nan_group_advantages(grouped, estimator, scale_rewards).reshape(-1).to(rewards.dtype)
    mean = grouped.mean(1, keepdim=True)
    if estimator == "reinforce++":
        return rewards.clone()
    if estimator == "reinforce++_baseline":
        return (grouped - mean).reshape(-1).to(rewards.dtype)
    if estimator == "rloo":
        others = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)
        return (grouped - others).reshape(-1).to(rewards.dtype)
    centred = grouped - mean
    if scale_rewards == "group":
        centred = centred / (grouped.std(1, keepdim=True) + STD_EPS) if num_generations > 1 else centred
    elif scale_rewards == "batch":
        centred = centred / (grouped.std() + STD_EPS) if grouped.numel() > 1 else centred
    return centred.reshape(-1).to(rewards.dtype)


def _nan_group_advantages(grouped: torch.Tensor, estimator: str, scale_rewards: str) -> torch.Tensor:
    """`group_advantages` over groups in which some rewards are NaN (unjudged): each statistic over
    a group's judged rewards only (TRL's nanmean / nanstd), and advantage 0 for the unjudged.
    Shape: grouped (groups, G) -> (groups, G)."""
    judged = ~torch.isnan(grouped)
    count = judged.sum(1, keepdim=True).double()
    total = torch.nansum(grouped, 1, keepdim=True)
    mean = total / count

    def std(x: torch.Tensor, keep: torch.Tensor, dim=None) -> torch.Tensor:  # unbiased, over `keep` only
        n = keep.sum(dim, keepdim=dim is not None).double()
        m = torch.where(keep, x, 0.0).sum(dim, keepdim=dim is not None) / n
        return (torch.where(keep, (x - m) ** 2, 0.0).sum(dim, keepdim=dim is not None) / (n - 1)).sqrt()

    if estimator == "reinforce++":
        out = grouped
    elif estimator == "reinforce++_baseline":
        out = grouped - mean
    elif estimator == "rloo":
        out = grouped - (total - grouped) / (count - 1)
    else:
        out = grouped - mean
        if scale_rewards == "group":
            out = out / (std(grouped, judged, 1) + STD_EPS)
        elif scale_rewards == "batch":
            out = out / (std(grouped, judged) + STD_EPS)
    return torch.nan_to_num(torch.where(judged, out, 0.0), nan=0.0)  # a group of one judged: no baseline, 0


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to `max_length − buffer`
    tokens, then falling linearly to `−factor` at `max_length`:
    `min(−(L − (L_max − L_buf)) / L_buf · factor, 0)`. Shape: lengths (n,) -> (n,)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong_buffer_len={buffer} must be in (0, max_new_tokens={max_length}]")
    excess = lengths.double() - (max_length - buffer)
    return torch.clamp(-excess / buffer * factor, max=0.0).float()


def log_importance_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """`log ρ_t = log π_θ − log π_old` per token (0 on padding), or with `level="sequence"` (GSPO,
    Zheng et al. 2025, eq. 7) each completion's length-normalised `(1 / L_i) Σ_t log ρ_t` on its
    every token. Shape: (n, t) -> (n, t)."""
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={level!r} must be 'token' or 'sequence'")
    log_ratio = zero_padding(logprobs - old_logprobs, loss_mask)
    if level == "sequence":
        lengths = loss_mask.sum(1).clamp(min=1)  # (n,)
        log_ratio = (masked_sum(log_ratio, loss_mask, dim=1) / lengths)[:, None].expand_as(logprobs)
    return log_ratio


def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       loss_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                       level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`ℓ_t = −min(ρ A, clip(ρ, 1 − ε, 1 + ε_high) A)` per token (PPO's surrogate; clip-higher:
    DAPO, Yu et al. 2025, eq. 10), with one advantage per completion broadcast over its tokens
    (or one per token: REINFORCE++).

    `level="sequence"` (GSPO, Zheng et al. 2025, eq. 7) uses the sequence ratio
    `s_i = exp((1 / L_i) Σ_t log ρ_t)` for every token of completion i, clipped per sequence.
    Returns ℓ (0 on padding; aggregate with `aggregate_loss`) and detached stats: the fraction of
    real tokens clipped below and above.
    Shape: logprobs, old_logprobs, loss_mask (n, t), advantages (n,) or (n, t) -> ℓ (n, t).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_importance_weights(logprobs, old_logprobs, loss_mask, level))
    adv = advantages[:, None].expand_as(ratio) if advantages.dim() == 1 else advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -zero_padding(torch.minimum(ratio * adv, clipped * adv), loss_mask)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)  # the clip is active below (TRL's clip_ratio/low)
        up = (ratio > 1 + high) & (adv > 0)
        stats = {"clip_ratio/low_mean": token_mean(low.float(), loss_mask),
                 "clip_ratio/high_mean": token_mean(up.float(), loss_mask)}
    return loss, stats


def aggregate_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, loss_type: str, max_completion_length: int,
                   total_tokens: float | None = None) -> torch.Tensor:
    """Reduce per-token losses to the microbatch's loss.

    - grpo (Shao et al. 2024, eq. 3): `mean_i (1 / L_i) Σ_t ℓ_it`.
    - bnpo: `Σ ℓ / (real tokens of this microbatch)`.
    - dr_grpo (Liu et al. 2025): `Σ ℓ / (n · max_completion_length)`.
    - dapo (Yu et al. 2025, eq. 8): `Σ ℓ / total_tokens`, the real tokens of the whole optimizer
      step across its microbatches and processes, so the step's gradient does not depend on
      how it is split (give `total_tokens`; the microbatch losses are then summed, not averaged).
    Shape: per_token, loss_mask (n, t) -> ().
    """
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"loss_type={loss_type!r} is not one of {AGGREGATIONS}")
    total = masked_sum(per_token, loss_mask)
    if loss_type == "grpo":
        return (masked_sum(per_token, loss_mask, dim=1) / loss_mask.sum(1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total / loss_mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length)
    if total_tokens is None or total_tokens <= 0:
        raise ValueError("loss_type='dapo' needs total_tokens: the real tokens of the whole optimizer step")
    return total / total_tokens
