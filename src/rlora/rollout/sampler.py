"""Sampling from the policy in the run's precision, and the reward adapter's scores of what was
sampled: what training's rollouts and evaluation share.

Notation: `b` rollouts.
"""

from __future__ import annotations

import functools

import torch

from rlora.models.precision import pass_precision
from rlora.models.sharding import run_through
from rlora.rollout.generation import Rollouts, generate_rollouts, stop_token_ids
from rlora.rollout.prompts import Prompt, end_of_turn_id, render_prompt


class Sampler:
    """The policy's rollouts for prompts given by index, under the run's precision (accelerate's
    autocast, or a bf16 base's adapter compute, `rlora.models.precision`)."""

    def __init__(self, policy, tokenizer, accelerator, model_config, stop_sequences: list[str], minibatch_size: int,
                 share_prompts: bool, episodes=None):
        self.policy, self.tokenizer, self.accelerator = policy, tokenizer, accelerator
        self.episodes = episodes  # an `rlora.rollout.episodes.EpisodeRunner`: multi-turn episodes, not completions
        self.adapter_compute_dtype = model_config.adapter_compute_dtype
        self.generation_dtype = None if model_config.generation_dtype is None else \
            getattr(torch, model_config.generation_dtype)  # the precision rollouts are sampled in; None = the model's
        self.stop_sequences, self.minibatch_size = stop_sequences, minibatch_size
        self.share_prompts = share_prompts  # a group's prompt runs once and its KV cache serves the group

    def precision(self, weights_dtype: torch.dtype | None = None):
        """The context every pass runs in: generation, scoring, the reference and the update;
        `weights_dtype` is the sampler's recast precision, when generation has one."""
        return pass_precision(self.accelerator, self.policy.base_model, self.adapter_compute_dtype, weights_dtype)

    def generate(self, index: list[int], gen_kwargs: dict, prompt_ids: list[list[int]], prompts: list[Prompt],
                 merged: bool = False, num_generations: int = 1, recast: bool = False) -> Rollouts:
        """Rollouts for the prompts at `index`: under accelerate's autocast, as the prepared policy's
        forward runs, on weights in `model.generation_dtype` when `recast` (rollouts; float32 then
        runs without autocast). A chat prompt's response also ends at the template's end-of-turn
        token. With an episode runner, each sample is a multi-turn episode."""
        dtype = self.generation_dtype if recast else None
        # a sharded policy samples within its root's forward, which gathers the root's weights
        if self.episodes is not None:  # its turns end at the template's end of turn too
            with self.precision(dtype):
                return run_through(self.policy, lambda: self.episodes.run(
                    self.policy, prompts, index, gen_kwargs, num_generations, self.share_prompts,
                    {"merged": merged, "dtype": dtype}))
        chosen = [prompts[i] for i in index]
        eot = self.end_of_turn if any(p.is_chat for p in chosen) else None
        if eot is not None and "eos_token_id" not in gen_kwargs:
            stops = stop_token_ids(gen_kwargs, self.tokenizer, self.policy.base_model.generation_config)
            gen_kwargs = {**gen_kwargs, "eos_token_id": stops + [eot] * (eot not in stops)}
        with self.precision(dtype):
            return run_through(self.policy, lambda: generate_rollouts(
                self.policy, self.tokenizer, [p.prompt for p in chosen], [prompt_ids[i] for i in index],
                gen_kwargs, self.stop_sequences, merged=merged, dtype=dtype,
                prompt_texts=[render_prompt(p, self.tokenizer) for p in chosen], num_generations=num_generations,
                share_prompt=self.share_prompts))

    @functools.cached_property
    def end_of_turn(self) -> int | None:
        """The chat template's end-of-turn token (found once, when a chat prompt first needs it)."""
        return end_of_turn_id(self.tokenizer)

    @torch.no_grad()
    def reward_adapter_scores(self, rollouts: Rollouts) -> torch.Tensor | None:
        """The reward adapter's score of each rollout (None without one), `minibatch_size` rows at
        a time. Shape: -> (b,)."""
        if not self.policy.has_reward_adapter:
            return None
        from rlora.reward_model import rollout_rows

        ids, mask = rollout_rows(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids,
                                 rollouts.response_mask, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        with self.precision():
            return run_through(self.policy, lambda: torch.cat([
                self.policy.reward_scores(i.to(device), m.to(device)).float().cpu()
                for i, m in zip(ids.split(self.minibatch_size), mask.split(self.minibatch_size))]))
