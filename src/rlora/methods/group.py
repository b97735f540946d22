"""The critic-free group methods (docs/design.md §5): GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++,
GSPO and CISPO, chosen by `advantage_estimator`, `scale_rewards`, `loss_type` and
`importance_sampling_level`.

Per phase: whole groups of `num_generations` completions are drawn and scored on one process
(with DAPO's dynamic sampling, groups whose rewards are all equal are replaced); each completion's
advantage comes from its group's rewards (REINFORCE++: per-token returns with −β·KL, whitened);
the rollout pass runs only what the settings need; each microbatch's loss is `loss_type`'s
(`rlora.algo.loss_types`), weighted by its share of the step. No value head, no KL controller.

Notation: `n` completions of a phase on this process, `G` completions per prompt, `r` response
length.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlora.algo import TokenSelection, gae, group_advantages, overlong_penalty, token_mean, token_rewards
from rlora.algo.loss_types import LOSS_TYPES, group_loss
from rlora.distributed import Processes, call_through
from rlora.methods.base import Layout, Method, Passes, loss_tokens, shares_of
from rlora.methods.draws import DynamicSampling, EveryDraw, equal_rewards
from rlora.rollout.generation import Rollouts
from rlora.rollout.forward import ResponseOutputs, forward_group_responses, forward_responses
from rlora.rollout.store import Experience, Scored


class GroupMethod(Method):
    """A group method, as its config section (TRL's `GRPOConfig` names) sets it."""

    value_head = False
    with_entropy = True
    progress_key = "reward"

    def __init__(self, config: Any, batch_size: int):
        super().__init__(config, batch_size)
        self.num_generations = config.num_generations
        self.loss_type = LOSS_TYPES[config.loss_type]
        self.max_new_tokens = (config.gen_experience_kwargs or config.gen_kwargs)["max_new_tokens"]
        self.reinforce = config.advantage_estimator.startswith("reinforce++")
        kl = config.beta > 0
        # with one optimizer step a phase the old log-probs are the current ones detached (TRL), unless
        # REINFORCE++ needs them for its KL reward
        one_step = config.ppo_epochs == 1 and batch_size >= config.num_rollouts
        self.passes = Passes(old_logprobs=not one_step or kl and self.reinforce, reference=kl)

    @property
    def shares_prompts(self) -> bool:
        return self.config.shared_prefix

    def layout(self, dist: Processes, train: Any) -> Layout:
        """Each process takes whole groups: a group's completions are generated and scored on one
        process, so its statistics are exact."""
        n, config = self.num_generations, self.config
        layout = Layout(n * dist.share(config.num_rollouts // n, "method.num_rollouts / num_generations"),
                        dist.share(train.batch_size, "train.batch_size"),
                        dist.share(train.minibatch_size or train.batch_size, "train.minibatch_size"))
        if config.shared_prefix and (layout.batch_size % n or layout.minibatch_size % n):
            raise ValueError(
                f"with method.shared_prefix each pass takes whole groups, but on {dist.world} processes a process "
                f"gets batches of {layout.batch_size} and microbatches of {layout.minibatch_size} completions, not "
                f"multiples of num_generations={n}; raise train.batch_size / train.minibatch_size to multiples of "
                f"{n * dist.world}, or set method.shared_prefix: false")
        if config.dynamic_sampling and config.max_num_gen_batches:
            least = math.ceil(layout.rollouts / config.chunk_size)  # draws with nothing dropped
            if config.max_num_gen_batches < least:
                raise ValueError(f"method.max_num_gen_batches={config.max_num_gen_batches} is fewer than the {least} "
                                 "chunks a phase needs even when no group is dropped; raise it (or method.chunk_size)")
        return layout

    def rollouts(self, layout: Layout, dist: Processes, pad_id: int) -> EveryDraw:
        n, config = self.num_generations, self.config
        if config.dynamic_sampling:
            return DynamicSampling(layout.rollouts // n, config.chunk_size // n, n, pad_id, config.max_num_gen_batches,
                                   dist)
        return EveryDraw(layout.rollouts // n, config.chunk_size // n, n, pad_id)

    def shape_chunk(self, scored: Scored) -> Scored:
        """One reward per completion (its group compares them), shaped by DAPO's overlong penalty
        when `overlong_buffer_len` is set."""
        if scored.scores.dim() == 2:
            raise ValueError("reward_fn returned per-token scores, but the group methods compare one reward per "
                             "completion within its group; return one number per sample (or use PPOConfig)")
        if self.config.overlong_buffer_len is None:
            return scored
        penalty = overlong_penalty(scored.rollouts.action_mask.sum(1), self.max_new_tokens,
                                   self.config.overlong_buffer_len, self.config.overlong_penalty_factor)
        return Scored(scored.rollouts, scored.scores + penalty, scored.values)

    def loss_mask(self, rollouts: Rollouts) -> torch.Tensor:
        """With `mask_truncated_completions`, completions cut at max_new_tokens stay out (DAPO)."""
        mask = rollouts.action_mask.clone()
        if self.config.mask_truncated_completions:
            mask &= ~rollouts.truncated[:, None]
        return mask

    def forward(self, model, policy, mb: Experience, temperature: float, **flags) -> ResponseOutputs:
        """With `shared_prefix`, each group's prompt runs once (`forward_group_responses`), as the
        forward of the prepared `model` so DDP still syncs gradients; callers run it under the
        run's precision, as it calls the model's parts rather than the forward accelerate wraps."""
        if not self.config.shared_prefix:
            return forward_responses(model, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                                     temperature=temperature, **flags)
        return call_through(model, policy, lambda: forward_group_responses(
            policy, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, self.num_generations,
            temperature=temperature, **flags))

    def advantages(self, exp: Experience, scores: torch.Tensor, score_sums: torch.Tensor, state,
                   dist: Processes) -> dict[str, Any]:
        """Each completion's advantage from its group (every process's groups: batch statistics
        over the whole phase), broadcast over its tokens; REINFORCE++ spreads the (baselined)
        reward as per-token rewards with −β·KL, takes discounted returns (GAE with V = 0 and
        λ = 1) and whitens them over every process. Shape: score_sums (N,) in rank order."""
        config, n, mask = self.config, len(exp), exp.action_mask
        advantages = group_advantages(score_sums, self.num_generations, config.advantage_estimator,
                                      config.scale_rewards)
        advantages = advantages[dist.rank * n:(dist.rank + 1) * n]  # this process's groups
        if not self.reinforce:
            exp.advantages = advantages[:, None] * mask
            return {}
        judged = ~torch.isnan(score_sums[dist.rank * n:(dist.rank + 1) * n])  # (n,) an unjudged one: advantage 0
        ref = exp.ref_logprobs if self.passes.reference else exp.logprobs  # beta = 0: no KL term
        own = TokenSelection(mask)  # the model's tokens as one sequence (a multi-turn episode's)
        token_level, kl = token_rewards(own.take(exp.logprobs), own.take(ref), own.mask, config.beta, advantages)
        returns, _ = gae(torch.zeros_like(token_level), token_level, own.mask, config.gamma, 1.0)
        exp.advantages = dist.whiten(own.put(returns), mask) * judged[:, None]
        # the per-sequence k1 in REINFORCE++'s rewards; "kl" is grpo's mean k3 per token in the loss
        return {"kl_in_reward": dist.mean(kl["kl"])} if config.beta > 0 else {}

    def order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """With `shared_prefix`, groups are shuffled, each group's rows kept together (every pass
        gets whole groups)."""
        if not self.config.shared_prefix:
            return torch.randperm(n, generator=generator)
        size = self.num_generations
        groups = torch.randperm(n // size, generator=generator)
        return (groups[:, None] * size + torch.arange(size)).reshape(-1)  # (n,)

    def step_shares(self, exp: Experience, batch: torch.Tensor, micro: list[torch.Tensor],
                    dist: Processes) -> tuple[list[float], torch.Tensor, float | None]:
        """A microbatch counts by its rows (a mean over completions) or its tokens (bnpo); a loss
        divided by the step's tokens (dapo, cispo) is summed as it is, × the processes that DDP
        averages over."""
        tokens = loss_tokens(exp, micro)
        if self.loss_type.divides_by_step_tokens:  # Σ ℓ over the step's real tokens on every process
            step_tokens = max(1.0, float(dist.mean(exp.loss_mask[batch].sum().double().reshape(1))) * dist.world)
            return [float(dist.world)] * len(micro), tokens, step_tokens
        counts = tokens if self.loss_type.divides_by_tokens else \
            torch.tensor([float(len(index)) for index in micro], dtype=torch.float64)
        return shares_of(counts), tokens, None

    def loss(self, out: ResponseOutputs, mb: Experience, step_tokens: float | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss_type`'s loss over the microbatch's `loss_mask`. Without an old-log-prob pass (one
        step a phase) the old log-probs are the current ones detached: ratio 1, the plain policy
        gradient. The KL term is in the loss except for REINFORCE++, which has it in its rewards."""
        config = self.config
        old = mb.logprobs if self.passes.old_logprobs else out.logprobs.detach()
        loss, stats = group_loss(out.logprobs, old, mb.advantages, mb.loss_mask, loss_type=config.loss_type,
                                 epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                                 level=config.importance_sampling_level, max_completion_length=self.max_new_tokens,
                                 beta=0.0 if self.reinforce else config.beta, ref_logprobs=mb.ref_logprobs,
                                 step_tokens=step_tokens, kl_bias_correction=config.use_bias_correction_kl)
        return loss, {**stats, "entropy": token_mean(out.entropy, mb.loss_mask)}

    def phase_stats(self, phase: Scored, dist: Processes) -> dict[str, Any]:
        """TRL's names, over every process's groups; rewards no function gave (NaN) left out."""
        scores = dist.all_values(phase.scores).reshape(-1, self.num_generations)  # (groups, G)
        lengths = dist.all_values(phase.rollouts.action_mask.sum(1).float())  # the model's tokens, as TRL
        judged = scores[~torch.isnan(scores)]
        return {"reward": judged.mean(), "reward_std": judged.std(),
                "frac_reward_zero_std": equal_rewards(scores).double().mean(),
                "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                "completions/max_length": lengths.max(),
                "completions/clipped_ratio": dist.all_values(phase.rollouts.truncated.float()).mean()}
