"""What differs between PPO and the group methods, chosen by `method.name`: which no-grad passes
a phase runs, the per-process layout a group method needs, and the loss of one microbatch. The
loop in `rlora.trainer` is the same for all.

Notation: `b` microbatch, `r` response length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlora.algo import group_policy_loss, masked_mean, masked_var, policy_loss, token_mean, value_loss
from rlora.config import GRPOConfig, PPOConfig, rollout_gen_kwargs
from rlora.rollout.forward import ResponseOutputs
from rlora.rollout.store import Experience


@dataclass(frozen=True)
class Passes:
    """Which no-grad passes a phase's rollout pass runs, as the method needs them."""

    old_logprobs: bool  # the policy's log-probs at rollout time (ratio and KL-in-reward baselines)
    values: bool  # the value head's (PPO's critic)
    reference: bool  # the reference's (adapter disabled) log-probs, for a KL term


def rollout_passes(method, batch_size: int) -> Passes:
    """PPO runs all three. A group method needs the old log-probs only when the phase takes more
    than one optimizer step (several epochs, or `batch_size` < `num_rollouts`: later steps see a
    policy that has moved) or for REINFORCE++'s KL reward; with one step they are the current
    ones detached, as TRL does. The reference runs only with `beta > 0`."""
    if not isinstance(method, GRPOConfig):
        return Passes(True, True, True)
    kl = method.beta > 0
    one_step = method.ppo_epochs == 1 and batch_size >= method.num_rollouts
    return Passes(not one_step or kl and method.advantage_estimator.startswith("reinforce++"), False, kl)


def check_group_layout(method: GRPOConfig, batch_size: int, minibatch_size: int, rollouts: int, world: int) -> None:
    """Refuses a group method's per-process layout (`batch_size`, `minibatch_size`, `rollouts`
    a phase, on `world` processes) that its settings cannot run, naming the fix."""
    G = method.num_generations
    if method.shared_prefix and (batch_size % G or minibatch_size % G):
        raise ValueError(
            f"with method.shared_prefix each pass takes whole groups, but on {world} processes a process gets "
            f"batches of {batch_size} and microbatches of {minibatch_size} completions, not multiples of "
            f"num_generations={G}; raise train.batch_size / train.minibatch_size to multiples of {G * world}, "
            "or set method.shared_prefix: false")
    if method.dynamic_sampling and method.max_num_gen_batches:
        least = math.ceil(rollouts / method.chunk_size)  # draws with nothing dropped
        if method.max_num_gen_batches < least:
            raise ValueError(f"method.max_num_gen_batches={method.max_num_gen_batches} is fewer than the {least} "
                             "chunks a phase needs even when no group is dropped; raise it (or method.chunk_size)")


def microbatch_shares(method, exp: Experience, micro: list[torch.Tensor]) -> tuple[list[float], torch.Tensor]:
    """Each microbatch's weight in its optimizer step, and its loss tokens (which weigh its stats).

    A microbatch's loss is a mean over its own rows (grpo, dr_grpo) or its own tokens (PPO's
    masked means over the response, bnpo over the loss mask); weighted by its share of the
    batch's rows or tokens, the step's loss is that mean over the whole batch, however it is
    split. dapo's loss is divided by the step's tokens already (weight 1, set by the caller).
    Shape: micro, index tensors into exp's n samples -> shares (len(micro),), tokens (len(micro),).
    """
    loss_tokens = torch.stack([exp.loss_mask[index].sum() for index in micro]).double()
    if not isinstance(method, GRPOConfig):
        counts = torch.stack([exp.response_mask[index].sum() for index in micro]).double()
    elif method.loss_type == "bnpo":
        counts = loss_tokens
    else:
        counts = torch.tensor([float(len(index)) for index in micro], dtype=torch.float64)
    shares = counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(micro))
    return shares.tolist(), loss_tokens


def ppo_loss(out: ResponseOutputs, mb: Experience, method: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss plus `vf_coef` × the clipped value loss of one microbatch."""
    pg_loss, pg_stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.response_mask, method.cliprange)
    vf_loss, vf_stats = value_loss(out.values, mb.values, mb.returns, mb.response_mask, method.cliprange_value)
    loss = pg_loss + method.vf_coef * vf_loss
    return loss, {
        "losses/total_loss": loss.detach(), "losses/policy_loss": pg_stats["policy_loss"],
        "losses/value_loss": vf_stats["value_loss"], "policy/approx_kl": pg_stats["approx_kl"],
        "policy/clipfrac": pg_stats["clipfrac"], "policy/ratio_mean": pg_stats["ratio_mean"],
        "policy/ratio_max_abs_dev": pg_stats["ratio_max_abs_dev"],
        "values/mean": vf_stats["values_mean"], "values/values_error": vf_stats["values_error"],
        "values/clipfrac": vf_stats["clipfrac"],
        "returns/mean": masked_mean(mb.returns, mb.response_mask),
        "returns/var": masked_var(mb.returns, mb.response_mask, unbiased=False),
    }


def group_loss(out: ResponseOutputs, mb: Experience, method: GRPOConfig, passes: Passes,
               total_tokens: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A group method's loss of one microbatch (`rlora.algo.group_policy_loss`) over its
    `loss_mask`. Without an old-log-prob pass (one epoch) the old log-probs are the current ones
    detached: ratio 1, the plain policy gradient. The KL term is in the loss for grpo and rloo;
    REINFORCE++ has it in its per-token rewards instead."""
    old = mb.logprobs if passes.old_logprobs else out.logprobs.detach()
    loss, stats = group_policy_loss(
        out.logprobs, old, mb.advantages, mb.loss_mask, epsilon=method.epsilon, epsilon_high=method.epsilon_high,
        level=method.importance_sampling_level, loss_type=method.loss_type,
        max_completion_length=rollout_gen_kwargs(method)["max_new_tokens"],
        beta=0.0 if method.advantage_estimator.startswith("reinforce++") else method.beta,
        ref_logprobs=mb.ref_logprobs, total_tokens=total_tokens)
    return loss, {**stats, "entropy": token_mean(out.entropy, mb.loss_mask)}
