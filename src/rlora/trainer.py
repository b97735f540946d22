"""The trainer: one visible loop over rollout phases for PPO and the group methods
(docs/design.md §4, §5).

`Trainer.learn` reads top to bottom: rollouts, scores, reward processing, the rollout pass
(only the passes the method needs: old log-probs, values, reference), advantages, the update
epochs, KL update, eval, checkpoint. What differs between PPO and the group methods (GRPO,
Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO) is chosen by `method.name` and computed by pure
functions in `rlora.algo` (`algo.group` for the group methods); generation and scoring live in
`rlora.rollout`.

Notation: `n` samples in a phase, `b` batch, `p` prompt length, `r` response length.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from transformers import TrainerState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlora import checkpoint, evaluation
from rlora.algo import (
    RunningMoments,
    gae,
    group_advantages,
    make_kl_controller,
    nan_moments,
    overlong_penalty,
    scale_and_clip_scores,
    token_rewards,
)
from rlora.config import Config, GRPOConfig, config_to_dict, rollout_gen_kwargs
from rlora.distributed import Processes, call_through
from rlora.methods import check_group_layout, group_loss, microbatch_shares, ppo_loss, rollout_passes
from rlora.models import Policy
from rlora.models.loading import check_positions
from rlora.models.precision import pass_precision
from rlora.optim import build_optimizer, build_scheduler, default_run_dir
from rlora.rollout.forward import ResponseOutputs, forward_group_responses, forward_responses
from rlora.rollout.generation import Rollouts, generate_rollouts, sampling_temperature, stop_token_ids
from rlora.rollout.prompts import Prompt, PromptLoader, end_of_turn_id, normalize_prompts, render_prompt, \
    tokenize_prompts
from rlora.rollout.rewards import RewardFunctions, ScoreBatch, add_scores, check_reward_given
from rlora.rollout.store import Experience, PhaseState, Scored
from rlora.signals import TrainingInterrupted, stop_on_signals
from rlora.tracking import Tracker, console, log_rollouts, plot_history


class Trainer:
    """PPO or a group method on a `Policy` whose roles share one base. Compose it; do not subclass it."""

    def __init__(self, config: Config, policy: Policy, tokenizer, reward_fn: Callable | list[Callable] | None,
                 prompts: list[Prompt], eval_prompts: list[Prompt], metric_fn: Callable | None = None,
                 stop_sequences: list[str] | None = None, accelerator: Accelerator | None = None,
                 verbose: bool = True):
        check_reward_given(reward_fn, policy.has_reward_adapter)
        self.config, self.tokenizer = config, tokenizer
        self.reward_fn = reward_fn if reward_fn is None or isinstance(reward_fn, RewardFunctions) else \
            RewardFunctions(reward_fn, config.task.reward_weights)
        self.metric_fn = metric_fn
        self.stop_sequences = list(stop_sequences or [])
        self.verbose = verbose
        train, method = config.train, config.method
        precision = {} if train.mixed_precision is None else {"mixed_precision": train.mixed_precision}
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), **precision)
        self.dist = Processes(self.accelerator)
        self.group = isinstance(method, GRPOConfig)
        self.group_size = method.num_generations if self.group else 1  # G completions per prompt
        self.passes = rollout_passes(method, train.batch_size)
        if self.group and policy.value_head is not None:
            raise ValueError("the group methods have no critic, but this policy has a value head; build it with "
                             "rlora.models.build_policy(config.model, tokenizer, value_head=False)")
        if not self.group and policy.value_head is None:
            raise ValueError("PPO needs a value head; build the policy with build_policy(config.model, tokenizer)")
        # num_rollouts, batch_size and minibatch_size are global: each process takes its share, in whole
        # groups: a group's completions are generated and scored on one process, so its statistics are exact
        self.rollouts_per_rank = self.group_size * self.dist.share(
            method.num_rollouts // self.group_size,
            "method.num_rollouts / num_generations" if self.group else "method.num_rollouts")
        self.batch_size = self.dist.share(train.batch_size, "train.batch_size")
        self.minibatch_size = self.dist.share(train.minibatch_size or train.batch_size, "train.minibatch_size")
        if self.group:
            check_group_layout(method, self.batch_size, self.minibatch_size, self.rollouts_per_rank, self.dist.world)
        check_positions(train.seq_length, policy.base_model.config)
        set_seed(train.seed, device_specific=True)  # each process samples differently; weights were seeded alike
        self.policy = policy
        self.optimizer = build_optimizer(config, policy.trainable_parameters())
        self.scheduler = build_scheduler(config, self.optimizer)
        if self.dist.world > 1:  # DDP syncs gradients of the trainable parameters only, never the frozen base
            frozen = [name for name, p in policy.named_parameters() if not p.requires_grad]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(policy, frozen)
        self.model, self.optimizer = self.accelerator.prepare(policy, self.optimizer)
        # train.batch_size is global, so the schedule advances once per optimizer step on any number of
        # processes; prepare() would wrap it with split_batches=False and step it once per process
        self.scheduler = AcceleratedScheduler(self.scheduler, self.optimizer, split_batches=True)
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        # ZeRO-3 shards the weights: every process must join each generation step
        self.gen_extra = {"synced_gpus": True} if deepspeed is not None and deepspeed.zero_stage == 3 else {}
        # PPO's KL controller and score moments (a group method's beta is fixed: a fixed controller)
        self.kl_ctl = make_kl_controller(method.beta, None, 1) if self.group else \
            make_kl_controller(method.init_kl_coef, method.target, method.horizon)
        self.running = RunningMoments()
        self.ref_mean, self.ref_std = (None, None) if self.group else (method.ref_mean, method.ref_std)

        rollout_kwargs = rollout_gen_kwargs(method)
        self.temperature = sampling_temperature(rollout_kwargs)  # every pass scores what was sampled
        max_new = rollout_kwargs["max_new_tokens"]
        max_new_eval = max(kwargs.get("max_new_tokens", method.gen_kwargs["max_new_tokens"])
                           for kwargs in [method.gen_kwargs, *method.eval_gen_kwargs.values()])
        self.prompts, self.eval_prompts = prompts, eval_prompts
        special = config.tokenizer.add_special_tokens
        self.prompt_ids = tokenize_prompts(prompts, tokenizer, train.seq_length - max_new, "prompts", special)
        if max_new_eval == max_new and eval_prompts == prompts[:len(eval_prompts)]:
            self.eval_prompt_ids = self.prompt_ids[:len(eval_prompts)]  # the default: tokenized (and warned) once
        else:
            self.eval_prompt_ids = tokenize_prompts(eval_prompts, tokenizer, train.seq_length - max_new_eval,
                                                    "eval_prompts", special)
        self.loader = PromptLoader(len(prompts), train.seed)  # the same order on every process
        self.shuffle = torch.Generator().manual_seed(train.seed)

        self.step = 0  # optimizer steps taken
        self.phase = 0  # rollout phases completed
        self.pending: PhaseState | None = None  # the phase whose PPO epochs are under way
        self.bad_steps = 0  # non-finite steps skipped in a row
        self.best_reward = -math.inf
        self.history: list[dict[str, Any]] = []
        self.run_dir = default_run_dir(config)
        resumed = None
        if train.resume_from_checkpoint:
            resumed = checkpoint.resolve(train.resume_from_checkpoint, self.run_dir if train.run_dir else None,
                                         train.checkpoint_dir)
            checkpoint.load(self, resumed)  # restores run_dir too, unless train.run_dir names one
        self.tracker = Tracker(self.run_dir, train.tracker, config_to_dict(config), train.project_name,
                               train.entity_name, train.group_name, train.tags,
                               enabled=self.accelerator.is_main_process, history=self.history if resumed else None,
                               run_name=train.run_name)
        steps_per_phase = method.ppo_epochs * math.ceil(method.num_rollouts / train.batch_size)
        self.total_steps = train.total_steps
        if train.epochs is not None and train.epochs * steps_per_phase < train.total_steps:
            self.total_steps = train.epochs * steps_per_phase
            warnings.warn(f"train.epochs={train.epochs} rollout phases of {steps_per_phase} optimizer steps each "
                          f"allow {self.total_steps} optimizer steps, fewer than train.total_steps="
                          f"{train.total_steps}: the run stops at step {self.total_steps}. Raise train.epochs (or "
                          "set it to null for no cap), or lower train.total_steps.", stacklevel=2)
        self._stop_signal: int | None = None
        # what TRL-style reward functions get as `trainer_state` (global_step: optimizer steps done)
        self.trainer_state = TrainerState(max_steps=self.total_steps)

    # ------------------------------------------------------------------ the loop
    def learn(self) -> "Trainer":
        """Train until `train.total_steps` optimizer steps (or `train.epochs` rollout phases, when set).

        SIGINT / SIGTERM (to any one process or to all) save a checkpoint at the next step boundary,
        then raise `TrainingInterrupted`; `train.resume_from_checkpoint` continues from it exactly.
        """
        train, method = self.config.train, self.config.method
        self.model.eval()  # dropout off in every PPO pass, so the ratio starts at 1 (docs/design.md §1)
        if self.step == 0 and not self.history:
            self.evaluate()  # the baseline, before any update
        progress = self._progress()
        task = progress.add_task(method.name.removesuffix("Config"), total=self.total_steps, completed=self.step,
                                 reward=float("nan"))
        with progress, stop_on_signals(self._on_signal):
            while self.step < self.total_steps:
                if self.pending is None:
                    t0 = time.perf_counter()
                    # 1. Rollouts: chunk_size completions at a time (whole groups of num_generations for the
                    #    group methods) until this process has its share of num_rollouts; each process takes
                    #    its slice of the same prompt chunks
                    # 2. Score each chunk with the reward function(s) (validated: count, numbers, finite;
                    #    several: their weighted sum), once on the main process for every process's
                    #    samples unless train.reward_on_all_ranks, plus the reward adapter's score; the
                    #    group methods shape overlong completions and, with dynamic sampling, drop groups
                    #    whose rewards are all equal and draw more prompts
                    scored, stats = self._collect()
                    rollouts, scores = scored.rollouts, scored.scores
                    if self.accelerator.is_main_process:
                        log_rollouts(self.config.train.rollout_logging_dir, self.phase + 1, self.step, rollouts,
                                     scores)
                    t_rollout = time.perf_counter()

                    # 3. Reward processing (PPO): running moments over per-sample sums of every process,
                    #    scale, clip (trlx order)
                    score_sums = self.dist.all_values(scores.sum(1) if scores.dim() == 2 else scores)  # (N,)
                    if not self.group:
                        if self.ref_mean is None:
                            self.ref_mean, self.ref_std = score_sums.mean().item(), score_sums.std().item()
                        self.running.update(score_sums)
                        scores = scale_and_clip_scores(scores, method.scale_reward, self.running, self.ref_std,
                                                       method.cliprange_reward)

                    # 4. One no-grad rollout pass with the passes the method needs (PPO: policy logprobs,
                    #    values and reference; a group method: old logprobs when the phase takes more than
                    #    one step, the reference with beta > 0, else none). It runs over the minibatches of the first
                    #    epoch, so that epoch's first minibatch sees exactly its layout (ratio exactly 1).
                    orders = [self._shuffled(len(rollouts.prompts)) for _ in range(method.ppo_epochs)]
                    exp = self._score_experience(rollouts, orders[0])
                    mask = exp.response_mask
                    if self.group:
                        # 5g. Advantages from each group's rewards (all processes' groups: exact groups, and
                        #     batch statistics over the whole phase); REINFORCE++ makes them per token
                        exp.advantages, kl_stats = self._group_advantages(exp, score_sums)
                    else:
                        # 5. Per-token rewards: -beta * KL per token, the score at the last real token
                        rewards, kl_stats = token_rewards(exp.logprobs, exp.ref_logprobs, mask, self.kl_ctl.value,
                                                          scores)
                        # 6. GAE, then advantages whitened over the real tokens of every process
                        advantages, returns = gae(exp.values, rewards, mask, method.gamma, method.lam)
                        exp.advantages, exp.returns = self.dist.whiten(advantages, mask), returns
                    kl_stats = {k: self.dist.mean(v) for k, v in kl_stats.items()}  # the KL controller's is global
                    t_pass = time.perf_counter()
                    if self.group:  # REINFORCE++'s per-sequence k1 in its rewards (grpo's k3 in the loss is "kl")
                        stats.update({"kl_in_reward": kl_stats["kl"]} if "kl" in kl_stats else {})
                    else:
                        stats.update({
                            "rollout_scores/mean": score_sums.mean(), "rollout_scores/std": score_sums.std(),
                            "rollout_scores/running_mean": self.running.mean,
                            "rollout_scores/running_std": self.running.std,
                            "policy/sqrt_kl": kl_stats["kl"].clamp(min=0).sqrt(), "policy/kl": kl_stats["kl"],
                            "policy/kl_per_token": kl_stats["kl_per_token"],
                            "rewards/non_score": kl_stats["non_score_reward"], "kl_ctl_value": self.kl_ctl.value,
                        })
                    stats.update({"time/rollout": t_rollout - t0, "time/rollout_pass": t_pass - t_rollout})
                    # the phase's rollouts are logged now, with its first step: a run that stops mid-phase has them
                    phase_stats = self._record(stats, step=self.step + 1, phase=self.phase + 1)
                    batches = [batch for order in orders for batch in order.split(self.batch_size)]
                    self.pending = PhaseState(exp, batches, 0, phase_stats)

                # 7. ppo_epochs passes over the shuffled experience, batch_size samples per optimizer
                #    step, resuming where a checkpoint left the phase
                phase = self.pending
                while phase.cursor < len(phase.batches) and self.step < self.total_steps:
                    t0 = time.perf_counter()
                    stats = self.train_step(phase.exp, phase.batches[phase.cursor])
                    phase.cursor += 1
                    self.step += 1
                    self._record({**stats, "time/step": time.perf_counter() - t0})
                    progress.update(task, completed=self.step, reward=phase.stats[self._reward_key])
                    if self.step % train.eval_interval == 0:
                        self.evaluate()
                    if self.step % train.checkpoint_interval == 0 and self.step < self.total_steps:
                        self.save()
                    if (signum := self._agreed_stop_signal()) is not None:
                        raise TrainingInterrupted(signum, self.save())

                # 8. KL controller: once per completed phase, on its mean KL, n = num_rollouts
                if phase.cursor == len(phase.batches):
                    if not self.group:
                        self.kl_ctl.update(phase.stats["policy/kl"], n_steps=method.num_rollouts)
                    self.phase += 1
                    self.pending = None

        # 9. Checkpoint and evaluate at the end (saved before an eval that an uninterrupted longer
        #    run would not do, so resuming with a larger train.total_steps continues exactly)
        self.save()
        if not any(r.get("eval") and r["step"] == self.step for r in self.history[-3:]):
            self.evaluate()
        if self.accelerator.is_main_process:
            plot_history(self.history, self.run_dir)
        self.tracker.close()
        self.accelerator.wait_for_everyone()  # no process exits while another still works
        return self

    # ------------------------------------------------------------------ pieces of the loop
    def _generate(self, index: list[int], gen_kwargs: dict, prompt_ids: list[list[int]], prompts: list[Prompt],
                  merged: bool = False, num_generations: int = 1, dtype: torch.dtype | None = None) -> Rollouts:
        """Rollouts for the prompts at `index`, in the run's precision: under accelerate's
        autocast, as the prepared policy's forward runs (bf16 sampling, bf16 scoring), on weights
        in `dtype` when given (`model.generation_dtype`; float32 then runs without autocast). A
        chat prompt's response also ends at the template's end-of-turn token."""
        chosen = [prompts[i] for i in index]
        eot = self._end_of_turn if any(p.is_chat for p in chosen) else None
        if eot is not None and "eos_token_id" not in gen_kwargs:
            stops = stop_token_ids(gen_kwargs, self.tokenizer, self.policy.base_model.generation_config)
            gen_kwargs = {**gen_kwargs, "eos_token_id": stops + [eot] * (eot not in stops)}
        with self._autocast(dtype):
            return generate_rollouts(self.policy, self.tokenizer, [p.prompt for p in chosen],
                                     [prompt_ids[i] for i in index], {**gen_kwargs, **self.gen_extra},
                                     self.stop_sequences, merged=merged, dtype=dtype,
                                     prompt_texts=[render_prompt(p, self.tokenizer) for p in chosen],
                                     num_generations=num_generations,
                                     share_prompt=self.group and self.config.method.shared_prefix)

    @functools.cached_property
    def _generation_dtype(self) -> torch.dtype | None:
        """The precision rollouts are sampled in (`model.generation_dtype`); None = the model's."""
        name = self.config.model.generation_dtype
        return None if name is None else getattr(torch, name)

    @functools.cached_property
    def _end_of_turn(self) -> int | None:
        """The chat template's end-of-turn token (found once, when a chat prompt first needs it)."""
        return end_of_turn_id(self.tokenizer)

    @torch.no_grad()
    def _reward_adapter_scores(self, rollouts) -> torch.Tensor | None:
        """The reward adapter's score of each rollout (None without one), `minibatch_size` rows
        at a time. Shape: -> (b,)."""
        if not self.policy.has_reward_adapter:
            return None
        from rlora.reward_model import rollout_rows

        ids, mask = rollout_rows(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids,
                                 rollouts.response_mask, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        with self._autocast():
            return torch.cat([self.policy.reward_scores(i.to(device), m.to(device)).float().cpu()
                              for i, m in zip(ids.split(self.minibatch_size), mask.split(self.minibatch_size))])

    @torch.no_grad()
    def _collect(self) -> tuple[Scored, dict[str, torch.Tensor]]:
        """Steps 1 and 2: this process's share of `num_rollouts`, generated and scored, and their
        statistics (over every process).

        The group methods draw whole groups and shape overlong completions (DAPO). With
        `dynamic_sampling`, a group whose rewards are all equal is dropped and more chunks are
        drawn; every process draws until all are full (the prompt order and the collectives stay
        in step), groups drawn beyond the phase's need are discarded (as DAPO does: sampled by this
        phase's policy, they would be off-policy in the next), and after `max_num_gen_batches` draws
        the phase is filled up with dropped groups.
        """
        method, G = self.config.method, self.group_size
        dynamic = self.group and method.dynamic_sampling
        need = self.rollouts_per_rank // G  # groups (PPO: samples) this process needs
        per_chunk = method.chunk_size // G  # prompts generated at once
        kept: list[Scored] = []
        aside: list[Scored] = []  # dynamic sampling: dropped groups, to fill up with after the cap
        draws = groups = equal_groups = 0
        while True:
            short = need - sum(len(c) for c in kept) // G
            if dynamic:  # the same number of draws on every process
                short = int(self.dist.max(torch.tensor([short])).item())
                if short <= 0 or method.max_num_gen_batches and draws >= method.max_num_gen_batches:
                    break
            elif short <= 0:
                break
            size = per_chunk if dynamic else min(per_chunk, short)
            index = self.loader.next_chunk(size * self.dist.world)[self.dist.rank * size:][:size]
            chunk = self._score(index, self._generate(index, rollout_gen_kwargs(method),
                                                      self.prompt_ids, self.prompts,
                                                      merged=method.merge_adapter_for_generation, num_generations=G,
                                                      dtype=self._generation_dtype))
            draws += 1
            if self.group:
                grouped = chunk.scores.reshape(-1, G)
                equal = grouped.amax(1) == grouped.amin(1)  # (size,) groups whose rewards are all equal, exactly
                groups, equal_groups = groups + len(equal), equal_groups + int(equal.sum())
                if dynamic:
                    rows = torch.arange(len(chunk)).reshape(-1, G)
                    aside.append(chunk.select(rows[equal].reshape(-1).tolist()))
                    chunk = chunk.select(rows[~equal].reshape(-1).tolist())
            kept.append(chunk)
        short = need - sum(len(c) for c in kept) // G
        if short > 0:  # dynamic sampling's cap was reached
            kept.append(Scored.concat(aside, self.tokenizer.pad_token_id).select(list(range(short * G))))
        phase = Scored.concat(kept, self.tokenizer.pad_token_id)
        surplus = (len(phase) - self.rollouts_per_rank) // G
        if surplus > 0:
            phase = phase.select(list(range(self.rollouts_per_rank)))

        stats: dict[str, torch.Tensor | float] = self.logged_by_reward_functions()
        for name, values in phase.values.items():  # each reward function's own mean and std over the samples it judged
            stats.update({f"rewards/{name}/{k}": v for k, v in nan_moments(self.dist.all_values(values)).items()})
        lengths = self.dist.all_values(phase.rollouts.response_mask.sum(1).float())
        if not self.group:
            return phase, {**stats, "response_length/mean": lengths.mean()}
        scores = self.dist.all_values(phase.scores)
        counts = self.dist.all_values(torch.tensor([[draws, groups, equal_groups, max(short, 0), max(surplus, 0)]],
                                                   dtype=torch.float64))
        stats.update({  # TRL's names
            "reward": scores.mean(), "reward_std": scores.reshape(-1, G).std(1).mean(),
            "frac_reward_zero_std": counts[:, 2].sum() / counts[:, 1].sum(),
            "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": self.dist.all_values(phase.rollouts.truncated.float()).mean(),
        })
        if dynamic:
            stats.update({"dynamic_sampling/draws": counts[:, 0].mean(),
                          "dynamic_sampling/dropped_groups": counts[:, 2].sum(),
                          "dynamic_sampling/filled": counts[:, 3].sum(),
                          "dynamic_sampling/discarded_groups": counts[:, 4].sum()})
        return phase, stats

    def _score(self, index: list[int], rollouts: Rollouts) -> Scored:
        """The rewards of one chunk (generated from the prompts at `index`): reward functions plus
        the reward adapter; the group methods' must be one per completion, shaped by DAPO's
        overlong penalty when `overlong_buffer_len` is set."""
        method, G = self.config.method, self.group_size
        metadata = [self.prompts[i].metadata for i in index for _ in range(G)]
        self.trainer_state.global_step = self.step
        fn_scores, values = (None, {}) if self.reward_fn is None else self.dist.score(
            self.reward_fn, ScoreBatch.of(rollouts, metadata), self.tokenizer, self.config.train.reward_on_all_ranks,
            self.trainer_state)
        lengths = rollouts.response_mask.sum(1)
        scores = add_scores(fn_scores, self._reward_adapter_scores(rollouts), lengths)
        if self.group and scores.dim() == 2:
            raise ValueError("reward_fn returned per-token scores, but the group methods compare one reward per "
                             "completion within its group; return one number per sample (or use PPOConfig)")
        if self.group and method.overlong_buffer_len is not None:
            max_new = rollout_gen_kwargs(method)["max_new_tokens"]
            scores = scores + overlong_penalty(lengths, max_new, method.overlong_buffer_len,
                                               method.overlong_penalty_factor)
        return Scored(rollouts, scores, values)

    def logged_by_reward_functions(self) -> dict[str, float]:
        """The means of what TRL-style reward functions logged with `log_metric` since last asked,
        the same on every process (each process's functions may have logged). `log_extra`'s
        columns are dropped: rlora keeps no completions table."""
        metrics = self.reward_fn.drain_logs()[0] if self.reward_fn is not None else {}
        if self.dist.world == 1:
            return metrics
        merged: dict[str, list[float]] = {}
        for part in self.dist.gather([metrics]):
            for name, value in part.items():
                merged.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in sorted(merged.items())}

    @property
    def _reward_key(self) -> str:
        return "reward" if self.group else "rollout_scores/mean"

    def _group_advantages(self, exp: Experience, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Step 5 of a group method: each completion's advantage from its group, broadcast over its
        tokens; REINFORCE++ spreads the (baselined) reward as per-token rewards with −beta·KL,
        takes discounted returns (GAE with V = 0 and λ = 1) and whitens them over every process.
        Shape: rewards (N,) of every process, rank order -> advantages (n, r)."""
        method, n, mask = self.config.method, len(exp), exp.response_mask
        advantages = group_advantages(rewards, self.group_size, method.advantage_estimator, method.scale_rewards)
        advantages = advantages[self.dist.rank * n:(self.dist.rank + 1) * n]  # this process's groups
        if not method.advantage_estimator.startswith("reinforce++"):
            return advantages[:, None] * mask, {}
        ref = exp.ref_logprobs if self.passes.reference else exp.logprobs  # beta = 0: no KL term
        token_level, kl_stats = token_rewards(exp.logprobs, ref, mask, method.beta, advantages)
        returns, _ = gae(torch.zeros_like(token_level), token_level, mask, method.gamma, 1.0)
        return self.dist.whiten(returns, mask), ({"kl": kl_stats["kl"]} if method.beta > 0 else {})

    @torch.no_grad()
    def _score_experience(self, rollouts: Rollouts, order: torch.Tensor) -> Experience:
        """The rollout pass over all samples in `order`, `minibatch_size` at a time (memory
        bounded by it), running only the passes the method needs (`self.passes`).

        Returns the experience with old logprobs, values and reference logprobs filled in
        (advantages and returns still zero; what no pass computed stays zero).
        """
        n, r = rollouts.response_ids.shape
        loss_mask = rollouts.response_mask.clone()
        if self.group and self.config.method.mask_truncated_completions:
            loss_mask &= ~rollouts.truncated[:, None]
        exp = Experience(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids, rollouts.response_mask,
                         logprobs=torch.zeros(n, r), values=torch.zeros(n, r), advantages=torch.zeros(n, r),
                         returns=torch.zeros(n, r), ref_logprobs=torch.zeros(n, r), loss_mask=loss_mask)
        passes = self.passes
        if not (passes.old_logprobs or passes.reference):
            return exp
        device = self.accelerator.device
        for index in order.split(self.minibatch_size):
            mb = exp.select(index).to(device)
            with self._autocast():  # the reference in the policy's precision, as the update's forward
                out = self._forward(self.policy, mb, with_reference=passes.reference, with_policy=passes.old_logprobs)
            width = mb.response_ids.shape[1]
            for name in ("logprobs", "values", "ref_logprobs"):
                if getattr(out, name) is not None:
                    getattr(exp, name)[index, :width] = getattr(out, name).float().cpu()
        return exp

    def _autocast(self, weights_dtype: torch.dtype | None = None):
        """The context every pass runs in: generation, scoring, the reference and the update;
        `weights_dtype` is the sampler's recast precision, when generation has one."""
        return pass_precision(self.accelerator, self.policy.base_model, self.config.model.adapter_compute_dtype,
                              weights_dtype)

    def _shuffled(self, n: int) -> torch.Tensor:
        """A random order of the phase's `n` samples; with `shared_prefix`, of its groups, each
        group's rows kept together (so every pass gets whole groups)."""
        if not (self.group and self.config.method.shared_prefix):
            return torch.randperm(n, generator=self.shuffle)
        G = self.group_size
        groups = torch.randperm(n // G, generator=self.shuffle)
        return (groups[:, None] * G + torch.arange(G)).reshape(-1)  # (n,)

    def _forward(self, model, mb: Experience, **flags) -> ResponseOutputs:
        """`forward_responses` of a microbatch at the sampling temperature, through `model` (the
        prepared one in the update); with `shared_prefix`, each group's prompt runs once
        (`forward_group_responses`), as the forward of that wrapper so DDP still syncs gradients.
        Callers run it under `_autocast()`: the shared pass calls the model's parts, not the
        forward accelerate wrapped."""
        if not (self.group and self.config.method.shared_prefix):
            return forward_responses(model, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                                     temperature=self.temperature, **flags)
        return call_through(model, self.policy, lambda: forward_group_responses(
            self.policy, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, self.group_size,
            temperature=self.temperature, **flags))

    def train_step(self, exp: Experience, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimizer step on the samples `batch` of `exp`, split into microbatches.

        Each microbatch's loss is weighted by its share of the batch (`microbatch_shares`: rows,
        or tokens where the loss is a mean over tokens), so the step's gradient does not depend
        on `minibatch_size`, unequal last microbatches included; DAPO's token-level loss is
        instead divided by the real tokens of the whole step on every process. Stats are
        detached tensors, their step values token-weighted means of the microbatches' (no host
        sync here, but DAPO's one token count).
        """
        method = self.config.method
        micro = batch.split(self.minibatch_size)
        dapo = self.group and method.loss_type == "dapo"
        total_tokens = None
        if dapo:  # Σ ℓ over the step's real tokens on every process: DDP averages, hence × world below
            total_tokens = max(1.0, float(self.dist.mean(exp.loss_mask[batch].sum().double().reshape(1))) *
                               self.dist.world)
        shares, tokens = microbatch_shares(method, exp, micro)
        stats: list[dict[str, torch.Tensor]] = []
        for i, index in enumerate(micro):
            mb = exp.select(index).to(self.accelerator.device)
            last = i == len(micro) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):  # one gradient all-reduce a step
                with self._autocast():
                    out = self._forward(self.model, mb, with_entropy=self.group)
                loss, step_stats = group_loss(out, mb, method, self.passes, total_tokens) if self.group else \
                    ppo_loss(out, mb, method)
                loss = loss * (self.dist.world if dapo else shares[i])
                self.accelerator.backward(loss)
            stats.append({"loss": loss.detach(), **step_stats})
        # The gradient's norm, clipped to train.max_grad_norm when set (after DDP's all-reduce: the same
        # on every process). A non-finite loss or gradient never reaches the weights: one host sync decides.
        params = [p for p in self.policy.trainable_parameters() if p.grad is not None]
        max_norm = self.config.train.max_grad_norm
        if max_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])) if params \
                else torch.zeros(())
        check = torch.stack([s["loss"] for s in stats]).sum() + grad_norm
        finite = bool(self.dist.max((~torch.isfinite(check)).float().reshape(1)).item() == 0)  # all agree
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses, before the schedule moves on
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            if self.bad_steps >= self.config.train.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} optimizer steps in a row had a non-finite loss or gradient (last at step "
                    f"{self.step + 1}); the weights were not updated by them. Lower the learning rate, check "
                    "reward_fn for extreme scores, or raise train.max_bad_steps.")
            warnings.warn(f"step {self.step + 1}: non-finite loss or gradient; step skipped "
                          f"({self.bad_steps} in a row, train.max_bad_steps={self.config.train.max_bad_steps})")
        self.optimizer.zero_grad(set_to_none=True)
        weights = tokens / tokens.sum() if tokens.sum() > 0 else torch.full_like(tokens, 1 / len(tokens))
        out = {key: (torch.stack([s[key] for s in stats]).double().cpu() * weights).sum().float() for key in stats[0]}
        loss = torch.stack([s.pop("loss") for s in stats]).sum()  # each was scaled to its share of the step
        if self.group:
            out["loss"] = loss
        else:
            del out["loss"]
            out["policy/ratio_max_abs_dev"] = torch.stack([s["policy/ratio_max_abs_dev"] for s in stats]).max()
        out["skipped"] = float(not finite)
        out["grad_norm"] = grad_norm.detach().float()
        out["learning_rate"] = learning_rate
        return out

    def _record(self, stats: dict[str, torch.Tensor | float], **extra: Any) -> dict[str, Any]:
        """Reduce a step's statistics to floats once and log them."""
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).cpu().reshape(()) for k in keys])
        if not extra.get("eval"):  # per-process step statistics -> the run's (eval stats are global already)
            values = torch.where(torch.tensor(["max" in k for k in keys]), self.dist.max(values),
                                 self.dist.mean(values))
        record = {"step": self.step, **extra, **dict(zip(keys, values.tolist()))}  # `step` in extra overrides
        self.history.append(record)
        self.tracker.log(record)
        return record

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("reward {task.fields[reward]:.3f}"),
                        console=console, disable=not (self.verbose and self.accelerator.is_main_process))

    # ------------------------------------------------------------------ public helpers
    def generate(self, prompts: list[str], **gen_kwargs) -> list[str]:
        """Outputs (generated text only) of the policy for `prompts`, with `method.gen_kwargs`
        updated by `gen_kwargs`."""
        gen_kwargs = {**self.config.method.gen_kwargs, **gen_kwargs}
        items = normalize_prompts(prompts)
        ids = tokenize_prompts(items, self.tokenizer, self.config.train.seq_length - gen_kwargs["max_new_tokens"],
                               add_special_tokens=self.config.tokenizer.add_special_tokens)
        chunk = self.config.method.chunk_size
        return [output for start in range(0, len(ids), chunk)
                for output in self._generate(list(range(start, min(start + chunk, len(ids)))), gen_kwargs, ids,
                                             items).outputs]

    def evaluate(self) -> dict[str, Any]:
        """Generate for `eval_prompts` with `method.gen_kwargs` (and each `eval_gen_kwargs`
        variant); log the reward and `metric_fn` means (`rlora.evaluation.evaluate`)."""
        return evaluation.evaluate(self)

    def save(self, path: str | None = None) -> str:
        """Write a checkpoint directory atomically (default `checkpoint_dir/step_N`, keeping the
        last `train.keep_checkpoints`); returns its path."""
        directory = os.path.join(self.run_dir, self.config.train.checkpoint_dir)
        written = checkpoint.save(self, path or os.path.join(directory, f"step_{self.step}"))
        if path is None and self.dist.is_main:
            checkpoint.prune(directory, self.config.train.keep_checkpoints)
        return written

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum

    def _agreed_stop_signal(self) -> int | None:
        """The signal any process has received, the same on every process: each checks at its own step
        boundary, and one stopping to save while another goes on to the next step's all-reduce would
        hang them both. With several processes, one small all-reduce a step."""
        signum = int(self.dist.max(torch.tensor([self._stop_signal or 0])).item())
        return signum or None


PPOTrainer = Trainer  # trlx's name; the one trainer runs every method
