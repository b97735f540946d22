"""PPO with a critic (docs/design.md §4): trlx's phase, its reward processing and KL controller.

Per phase: the terminal (or dense) scores of every process update the running moments and are
scaled and clipped in trlx's order; the rollout pass gives old log-probs, values and the
reference's log-probs; per-token rewards are −β·KL plus the score at the last real token; GAE
gives advantages (whitened over every process's real tokens) and returns; each microbatch's loss
is the clipped policy loss plus `vf_coef` × the clipped value loss; after the phase the KL
controller sees its mean KL.

Notation: `n` samples, `b` microbatch, `r` response length.
"""

from __future__ import annotations

from typing import Any

import torch

from rlora.algo import (
    TokenSelection,
    gae,
    make_kl_controller,
    masked_mean,
    masked_var,
    policy_loss,
    scale_and_clip_scores,
    token_rewards,
    value_loss,
)
from rlora.distributed import Processes
from rlora.methods.base import Layout, Method, Passes, loss_tokens, shares_of
from rlora.methods.draws import EveryDraw
from rlora.rollout.forward import ResponseOutputs, forward_responses
from rlora.rollout.store import Experience, Scored
from rlora.state import RunState


class PPO(Method):
    """PPO (Schulman et al. 2017) as trlx runs it, with a value head on the one base."""

    value_head = True
    with_entropy = False
    progress_key = "rollout_scores/mean"
    passes = Passes(old_logprobs=True, reference=True)

    def layout(self, dist: Processes, train: Any) -> Layout:
        return Layout(dist.share(self.config.num_rollouts, "method.num_rollouts"),
                      dist.share(train.batch_size, "train.batch_size"),
                      dist.share(train.minibatch_size or train.batch_size, "train.minibatch_size"))

    def shape_chunk(self, scored: Scored) -> Scored:
        """A sample no reward function judged (reward NaN) trains on 0, as trlx's PPO would."""
        return Scored(scored.rollouts, torch.nan_to_num(scored.scores, nan=0.0), scored.values)

    def run_state(self, loader, shuffle: torch.Generator, run_dir: str) -> RunState:
        """trlx's KL controller (fixed, or adaptive with a `target`) and reference reward statistics."""
        config = self.config
        return RunState(loader, shuffle, kl_ctl=make_kl_controller(config.init_kl_coef, config.target, config.horizon),
                        ref_mean=config.ref_mean, ref_std=config.ref_std, run_dir=run_dir)

    def rollouts(self, layout: Layout, dist: Processes, pad_id: int) -> EveryDraw:
        return EveryDraw(layout.rollouts, self.config.chunk_size, 1, pad_id)

    def shape_phase(self, scores: torch.Tensor, score_sums: torch.Tensor, state) -> torch.Tensor:
        """trlx's order: running moments over every process's per-sample sums, then scale, clip."""
        if state.ref_mean is None:
            state.ref_mean, state.ref_std = score_sums.mean().item(), score_sums.std().item()
        state.running.update(score_sums)
        return scale_and_clip_scores(scores, self.config.scale_reward, state.running, state.ref_std,
                                     self.config.cliprange_reward)

    def forward(self, model, policy, mb: Experience, temperature: float, **flags) -> ResponseOutputs:
        return forward_responses(model, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                                 temperature=temperature, **flags)

    def advantages(self, exp: Experience, scores: torch.Tensor, score_sums: torch.Tensor, state,
                   dist: Processes) -> dict[str, Any]:
        """Per-token rewards (−β·KL, the score at the model's last token), GAE, advantages whitened
        over every process's real tokens. In a multi-turn episode these run over the model's own
        tokens in order, as one sequence: γ and λ discount per model token, and the environment's
        tokens between turns are no time steps (they get no reward, value or advantage)."""
        mask = exp.action_mask
        own = TokenSelection(mask)  # the model's tokens as one sequence: an environment turn is no time step
        scores = own.take(scores) if scores.dim() == 2 else scores
        rewards, kl = token_rewards(own.take(exp.logprobs), own.take(exp.ref_logprobs), own.mask,
                                    state.kl_ctl.value, scores)
        advantages, returns = gae(own.take(exp.values), rewards, own.mask, self.config.gamma, self.config.lam)
        exp.advantages, exp.returns = dist.whiten(own.put(advantages), mask), own.put(returns)
        kl = {k: dist.mean(v) for k, v in kl.items()}  # the KL controller's is global
        return {
            "rollout_scores/mean": score_sums.mean(), "rollout_scores/std": score_sums.std(),
            "rollout_scores/running_mean": state.running.mean, "rollout_scores/running_std": state.running.std,
            "policy/sqrt_kl": kl["kl"].clamp(min=0).sqrt(), "policy/kl": kl["kl"],
            "policy/kl_per_token": kl["kl_per_token"], "rewards/non_score": kl["non_score_reward"],
            "kl_ctl_value": state.kl_ctl.value,
        }

    def step_shares(self, exp: Experience, batch: torch.Tensor, micro: list[torch.Tensor],
                    dist: Processes) -> tuple[list[float], torch.Tensor, float | None]:
        """Both losses are means over the response tokens: each microbatch counts by its tokens."""
        tokens = loss_tokens(exp, micro)
        return shares_of(tokens), tokens, None

    def loss(self, out: ResponseOutputs, mb: Experience, step_tokens: float | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped policy loss plus `vf_coef` × the clipped value loss of one microbatch."""
        config = self.config
        pg_loss, pg_stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.loss_mask, config.cliprange)
        vf_loss, vf_stats = value_loss(out.values, mb.values, mb.returns, mb.loss_mask, config.cliprange_value)
        loss = pg_loss + config.vf_coef * vf_loss
        return loss, {
            "losses/total_loss": loss.detach(), "losses/policy_loss": pg_stats["policy_loss"],
            "losses/value_loss": vf_stats["value_loss"], "policy/approx_kl": pg_stats["approx_kl"],
            "policy/clipfrac": pg_stats["clipfrac"], "policy/ratio_mean": pg_stats["ratio_mean"],
            "policy/ratio_max_abs_dev": pg_stats["ratio_max_abs_dev"],
            "values/mean": vf_stats["values_mean"], "values/values_error": vf_stats["values_error"],
            "values/clipfrac": vf_stats["clipfrac"],
            "returns/mean": masked_mean(mb.returns, mb.loss_mask),
            "returns/var": masked_var(mb.returns, mb.loss_mask, unbiased=False),
        }

    def phase_stats(self, phase: Scored, dist: Processes) -> dict[str, Any]:
        return {"response_length/mean": dist.all_values(phase.rollouts.action_mask.sum(1).float()).mean()}

    def end_phase(self, stats: dict[str, float], state) -> None:
        """The KL controller, once per phase, on its mean KL with n = num_rollouts (trlx)."""
        state.kl_ctl.update(stats["policy/kl"], n_steps=self.config.num_rollouts)
