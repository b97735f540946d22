"""The PPO trainer: one visible loop over rollout phases (SPEC §4).

`PPOTrainer.learn` reads top to bottom: rollouts, scores, reward processing, the rollout
pass (policy, values, reference), advantages, PPO epochs, KL update, eval, checkpoint. The
maths lives in `rlora.algo` as pure functions; generation and scoring in `rlora.rollout`.

Notation: `n` samples in a phase, `b` batch, `p` prompt length, `r` response length.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlora import checkpoint
from rlora.algo import (
    RunningMoments,
    gae,
    make_kl_controller,
    masked_mean,
    masked_var,
    nan_moments,
    policy_loss,
    scale_and_clip_scores,
    token_rewards,
    value_loss,
)
from rlora.config import Config, config_to_dict
from rlora.distributed import Processes
from rlora.models import Policy
from rlora.rollout.generation import Rollouts, generate_rollouts, sampling_temperature, stop_token_ids
from rlora.rollout.prompts import Prompt, PromptLoader, end_of_turn_id, normalize_prompts, render_prompt, \
    tokenize_prompts
from rlora.rollout.reward_fns import RewardFunctions, ScoreBatch
from rlora.rollout.scoring import collate_metadata, forward_responses, validate_scores
from rlora.rollout.store import Experience, concat_rollouts
from rlora.tracking import Tracker, console, eval_table, plot_history


def build_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by `optimizer.name` over the trainable parameters only."""
    kwargs = dict(config.optimizer.kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    name = config.optimizer.name
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"optimizer.name={name!r} is not one of {sorted(classes)}")
    return classes[name](params, **kwargs)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule named by `scheduler.name`, stepped once per optimizer step."""
    name, kwargs = config.scheduler.name, dict(config.scheduler.kwargs)
    if name == "cosine_annealing":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
    if name == "linear":
        kwargs.setdefault("total_iters", config.train.total_steps)
        return torch.optim.lr_scheduler.LinearLR(optimizer, **kwargs)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"scheduler.name={name!r} is not one of ['constant', 'cosine_annealing', 'linear']")


def default_run_dir(config: Config) -> str:
    if config.train.run_dir:
        return config.train.run_dir
    return os.path.join(config.train.logging_dir or "runs", time.strftime("%Y%m%d-%H%M%S"))


class PPOTrainer:
    """PPO on a `Policy` whose roles share one base. Compose it; do not subclass it."""

    def __init__(self, config: Config, policy: Policy, tokenizer, reward_fn: Callable | list[Callable] | None,
                 prompts: list[Prompt], eval_prompts: list[Prompt], metric_fn: Callable | None = None,
                 stop_sequences: list[str] | None = None, accelerator: Accelerator | None = None,
                 verbose: bool = True):
        if reward_fn is None and not policy.has_reward_adapter:
            raise ValueError("PPO needs rewards: pass reward_fn(samples, prompts, outputs, tokenizer, **metadata), "
                             "or set model.reward_adapter to a reward adapter trained with `rlora rm`")
        self.config, self.tokenizer = config, tokenizer
        self.reward_fn = reward_fn if reward_fn is None or isinstance(reward_fn, RewardFunctions) else \
            RewardFunctions(reward_fn, config.task.reward_weights)
        self.metric_fn = metric_fn
        self.stop_sequences = list(stop_sequences or [])
        self.verbose = verbose
        train, method = config.train, config.method
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.dist = Processes(self.accelerator)
        # num_rollouts, batch_size and minibatch_size are global: each process takes its share
        self.rollouts_per_rank = self.dist.share(method.num_rollouts, "method.num_rollouts")
        self.batch_size = self.dist.share(train.batch_size, "train.batch_size")
        self.minibatch_size = self.dist.share(train.minibatch_size or train.batch_size, "train.minibatch_size")
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
        self.kl_ctl = make_kl_controller(method.init_kl_coef, method.target, method.horizon)
        self.running = RunningMoments()
        self.ref_mean, self.ref_std = method.ref_mean, method.ref_std

        rollout_kwargs = method.gen_experience_kwargs or method.gen_kwargs
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
        self.total_steps = min(train.total_steps, train.epochs * steps_per_phase)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ the loop
    def learn(self) -> "PPOTrainer":
        """Run PPO until `train.total_steps` optimizer steps or `train.epochs` rollout phases.

        SIGINT / SIGTERM (to any one process or to all) save a checkpoint at the next step boundary,
        then raise `TrainingInterrupted`; `train.resume_from_checkpoint` continues from it exactly.
        """
        train, method = self.config.train, self.config.method
        self.model.eval()  # dropout off in every PPO pass, so the ratio starts at 1 (SPEC §1)
        if self.step == 0 and not self.history:
            self.evaluate()  # the baseline, before any update
        progress = self._progress()
        task = progress.add_task("PPO", total=self.total_steps, completed=self.step, reward=float("nan"))
        with progress, self._stop_on_signals():
            while self.step < self.total_steps:
                if self.pending is None:
                    t0 = time.perf_counter()
                    # 1. Rollouts: chunk_size prompts at a time until this process has its share of
                    #    num_rollouts (each process takes its slice of the same prompt chunks)
                    # 2. Score each chunk with the reward function(s) (validated: count, numbers, finite;
                    #    several: their weighted sum), once on the main process for every process's
                    #    samples unless train.reward_on_all_ranks, plus the reward adapter's score
                    #    (each process scores its own samples)
                    chunks, chunk_scores, chunk_values = [], [], []
                    while (n := sum(len(c.prompts) for c in chunks)) < self.rollouts_per_rank:
                        size = min(method.chunk_size, self.rollouts_per_rank - n)
                        index = self.loader.next_chunk(size * self.dist.world)[self.dist.rank * size:][:size]
                        rollouts = self._generate(index, method.gen_experience_kwargs or method.gen_kwargs,
                                                  self.prompt_ids, self.prompts,
                                                  merged=method.merge_adapter_for_generation)
                        chunks.append(rollouts)
                        fn_scores, values = (None, {}) if self.reward_fn is None else self.dist.score(
                            self.reward_fn, ScoreBatch.of(rollouts, [self.prompts[i].metadata for i in index]),
                            self.tokenizer, train.reward_on_all_ranks)
                        chunk_values.append(values)
                        chunk_scores.append(add_scores(fn_scores, self._reward_adapter_scores(rollouts),
                                                       rollouts.response_mask.sum(1)))
                    rollouts = concat_rollouts(chunks, self.tokenizer.pad_token_id)
                    per_function = {}  # each reward function's own mean and std over the samples it judged
                    for name in chunk_values[0]:
                        moments = nan_moments(self.dist.all_values(torch.cat([v[name] for v in chunk_values])))
                        per_function.update({f"rewards/{name}/{k}": v for k, v in moments.items()})
                    scores = concat_scores(chunk_scores, rollouts.response_ids.shape[1])
                    self._log_rollouts(rollouts, scores)
                    t_rollout = time.perf_counter()

                    # 3. Reward processing: running moments over per-sample sums of every process,
                    #    scale, clip (trlx order)
                    score_sums = self.dist.all_values(scores.sum(1) if scores.dim() == 2 else scores)  # (N,)
                    if self.ref_mean is None:
                        self.ref_mean, self.ref_std = score_sums.mean().item(), score_sums.std().item()
                    self.running.update(score_sums)
                    scores = scale_and_clip_scores(scores, method.scale_reward, self.running, self.ref_std,
                                                   method.cliprange_reward)

                    # 4. One no-grad rollout pass: policy logprobs and values, reference logprobs. It
                    #    runs over the minibatches of the first PPO epoch, so that epoch's first
                    #    minibatch sees exactly the rollout pass's layout (ratio exactly 1 there).
                    orders = [torch.randperm(len(rollouts.prompts), generator=self.shuffle)
                              for _ in range(method.ppo_epochs)]
                    exp, ref_logprobs = self._score_experience(rollouts, orders[0])
                    mask = exp.response_mask

                    # 5. Per-token rewards: -beta * KL per token, the score at the last real token
                    rewards, kl_stats = token_rewards(exp.logprobs, ref_logprobs, mask, self.kl_ctl.value, scores)

                    # 6. GAE, then advantages whitened over the real tokens of every process
                    advantages, returns = gae(exp.values, rewards, mask, method.gamma, method.lam)
                    exp.advantages, exp.returns = self.dist.whiten(advantages, mask), returns
                    kl_stats = {k: self.dist.mean(v) for k, v in kl_stats.items()}  # the KL controller's is global
                    t_pass = time.perf_counter()
                    stats = {
                        "rollout_scores/mean": score_sums.mean(), "rollout_scores/std": score_sums.std(),
                        "rollout_scores/running_mean": self.running.mean,
                        "rollout_scores/running_std": self.running.std,
                        "policy/sqrt_kl": kl_stats["kl"].clamp(min=0).sqrt(), "policy/kl": kl_stats["kl"],
                        "policy/kl_per_token": kl_stats["kl_per_token"],
                        "rewards/non_score": kl_stats["non_score_reward"], "kl_ctl_value": self.kl_ctl.value,
                        "response_length/mean": self.dist.mean(mask.sum(1).float().mean()),
                        "time/rollout": t_rollout - t0, "time/rollout_pass": t_pass - t_rollout, **per_function,
                    }
                    batches = [batch for order in orders for batch in order.split(self.batch_size)]
                    self.pending = PhaseState(exp, batches, 0, {k: float(v) for k, v in stats.items()},
                                              time.perf_counter())

                # 7. ppo_epochs passes over the shuffled experience, batch_size samples per optimizer
                #    step, resuming where a checkpoint left the phase
                phase = self.pending
                while phase.cursor < len(phase.batches) and self.step < self.total_steps:
                    stats = self.train_step(phase.exp, phase.batches[phase.cursor])
                    phase.cursor += 1
                    self.step += 1
                    self._record(stats)
                    progress.update(task, completed=self.step, reward=phase.stats["rollout_scores/mean"])
                    if self.step % train.eval_interval == 0:
                        self.evaluate()
                    if self.step % train.checkpoint_interval == 0 and self.step < self.total_steps:
                        self.save()
                    if (signum := self._agreed_stop_signal()) is not None:
                        raise TrainingInterrupted(signum, self.save())

                # 8. KL controller: once per completed phase, on its mean KL, n = num_rollouts
                if phase.cursor == len(phase.batches):
                    self.kl_ctl.update(phase.stats["policy/kl"], n_steps=method.num_rollouts)
                    self.phase += 1
                    self._record({**phase.stats, "time/update": time.perf_counter() - phase.t_update},
                                 phase=self.phase)
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
                  merged: bool = False) -> Rollouts:
        """Rollouts for the prompts at `index`, in the run's precision: under accelerate's
        autocast, as the prepared policy's forward runs (bf16 sampling, bf16 scoring). A chat
        prompt's response also ends at the template's end-of-turn token."""
        chosen = [prompts[i] for i in index]
        eot = self._end_of_turn if any(p.is_chat for p in chosen) else None
        if eot is not None and "eos_token_id" not in gen_kwargs:
            stops = stop_token_ids(gen_kwargs, self.tokenizer, self.policy.base_model.generation_config)
            gen_kwargs = {**gen_kwargs, "eos_token_id": stops + [eot] * (eot not in stops)}
        with self.accelerator.autocast():
            return generate_rollouts(self.policy, self.tokenizer, [p.prompt for p in chosen],
                                     [prompt_ids[i] for i in index], {**gen_kwargs, **self.gen_extra},
                                     self.stop_sequences, merged=merged,
                                     prompt_texts=[render_prompt(p, self.tokenizer) for p in chosen])

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
        from rlora.reward import rollout_rows

        ids, mask = rollout_rows(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids,
                                 rollouts.response_mask, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        with self.accelerator.autocast():
            return torch.cat([self.policy.reward_scores(i.to(device), m.to(device)).float().cpu()
                              for i, m in zip(ids.split(self.minibatch_size), mask.split(self.minibatch_size))])

    @torch.no_grad()
    def _score_experience(self, rollouts, order: torch.Tensor) -> tuple[Experience, torch.Tensor]:
        """The rollout pass over all samples in `order`, `minibatch_size` at a time (memory
        bounded by it).

        Returns the experience with old logprobs and values filled in (advantages and returns
        still zero) and the reference logprobs. Shape: ref_logprobs (n, r).
        """
        n, r = rollouts.response_ids.shape
        exp = Experience(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids, rollouts.response_mask,
                         logprobs=torch.zeros(n, r), values=torch.zeros(n, r), advantages=torch.zeros(n, r),
                         returns=torch.zeros(n, r))
        ref = torch.zeros(n, r)
        device = self.accelerator.device
        for index in order.split(self.minibatch_size):
            mb = exp.select(index).to(device)
            with self.accelerator.autocast():  # the reference in the policy's precision, as the update's forward
                logprobs, values, ref_logprobs, _ = forward_responses(
                    self.policy, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, with_reference=True,
                    temperature=self.temperature)
            width = mb.response_ids.shape[1]
            exp.logprobs[index, :width] = logprobs.float().cpu()
            exp.values[index, :width] = values.float().cpu()
            ref[index, :width] = ref_logprobs.float().cpu()
        return exp, ref

    def train_step(self, exp: Experience, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimizer step on the samples `batch` of `exp`, split into microbatches.

        Each microbatch's loss is divided by the number of microbatches, so the step's gradient
        is their mean whatever `minibatch_size` is. Stats are detached tensors (no host sync here).
        """
        method = self.config.method
        micro = batch.split(self.minibatch_size)
        stats: list[dict[str, torch.Tensor]] = []
        for i, index in enumerate(micro):
            mb = exp.select(index).to(self.accelerator.device)
            last = i == len(micro) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):  # one gradient all-reduce a step
                logprobs, values, _, _ = forward_responses(self.model, mb.query_ids, mb.query_mask, mb.response_ids,
                                                        mb.response_mask, temperature=self.temperature)
                pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                method.cliprange)
                vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.response_mask,
                                               method.cliprange_value)
                loss = pg_loss + method.vf_coef * vf_loss
                self.accelerator.backward(loss / len(micro))
            stats.append({
                "losses/total_loss": loss.detach(), "losses/policy_loss": pg_stats["policy_loss"],
                "losses/value_loss": vf_stats["value_loss"], "policy/approx_kl": pg_stats["approx_kl"],
                "policy/clipfrac": pg_stats["clipfrac"], "policy/ratio_mean": pg_stats["ratio_mean"],
                "policy/ratio_max_abs_dev": pg_stats["ratio_max_abs_dev"],
                "values/mean": vf_stats["values_mean"], "values/values_error": vf_stats["values_error"],
                "values/clipfrac": vf_stats["clipfrac"],
                "returns/mean": masked_mean(mb.returns, mb.response_mask),
                "returns/var": masked_var(mb.returns, mb.response_mask, unbiased=False),
            })
        # A non-finite loss or gradient never reaches the weights: one host sync per step decides.
        grads = [p.grad for p in self.policy.trainable_parameters() if p.grad is not None]
        check = torch.stack([s["losses/total_loss"] for s in stats]).sum() + sum(g.float().norm() for g in grads)
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
        out = {key: torch.stack([s[key] for s in stats]).mean() for key in stats[0]}
        out["skipped"] = float(not finite)
        out["policy/ratio_max_abs_dev"] = torch.stack([s["policy/ratio_max_abs_dev"] for s in stats]).max()
        out["learning_rate"] = learning_rate
        return out

    def _record(self, stats: dict[str, torch.Tensor | float], **extra: Any) -> dict[str, Any]:
        """Reduce a step's statistics to floats once and log them."""
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).cpu().reshape(()) for k in keys])
        if not extra.get("eval"):  # per-process step statistics -> the run's (eval stats are global already)
            values = torch.where(torch.tensor(["max" in k for k in keys]), self.dist.max(values),
                                 self.dist.mean(values))
        record = {"step": self.step, **extra, **dict(zip(keys, values.tolist()))}
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Generate for `eval_prompts` with `method.gen_kwargs` (and each `eval_gen_kwargs`
        variant); log the reward and `metric_fn` means. Processes share the prompts; the main
        process scores them all."""
        was_training = self.policy.training
        self.policy.eval()
        method = self.config.method
        variants = {"": method.gen_kwargs, **{f"{name}/": {**method.gen_kwargs, **kwargs}
                                              for name, kwargs in method.eval_gen_kwargs.items()}}
        stats: dict[str, Any] = {}
        tables = []
        for prefix, gen_kwargs in variants.items():
            batch, scores = self._eval_samples(gen_kwargs)
            if not self.dist.is_main:
                continue
            by_function: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(batch) if self.reward_fn is not None else 0, method.chunk_size):
                total, values = self.reward_fn(batch[start:start + method.chunk_size], self.tokenizer)
                for i, value in enumerate((total.sum(1) if total.dim() == 2 else total).tolist(), start):
                    scores[i] += value
                for name, v in values.items():
                    by_function.setdefault(name, []).append(v)
            for name, values in by_function.items() if len(by_function) > 1 else ():
                stats[f"reward/{prefix}{name}/mean"] = float(nan_moments(torch.cat(values))["mean"])
            stats[f"reward/{prefix}mean"] = sum(scores) / len(scores)
            if self.metric_fn is not None:
                samples = [p + o for p, o in zip(batch.prompt_texts, batch.outputs)]
                metrics = self.metric_fn(samples=samples, prompts=batch.prompts, outputs=batch.outputs,
                                         **collate_metadata(batch.metadata))
                for name, values in metrics.items():
                    values = validate_scores(values, [1] * len(samples), what=f"metric_fn[{name!r}]")
                    stats[f"metrics/{prefix}{name}"] = values.mean().item()
            if not prefix:
                tables.append(eval_table(batch.prompt_texts, batch.outputs, scores, self.step))
        stats = self.dist.broadcast(stats)
        record = self._record(stats, eval=True)
        if self.config.train.save_best and self.step > 0 and stats["reward/mean"] > self.best_reward:
            self.best_reward = stats["reward/mean"]
            self.save(os.path.join(self.run_dir, self.config.train.checkpoint_dir, "best"))
        if self.verbose and self.dist.is_main:
            for table in tables:
                console.print(table)
            console.print(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        self.policy.train(was_training)
        return record

    def _eval_samples(self, gen_kwargs: dict) -> tuple[ScoreBatch, list[float]]:
        """The samples of one pass over `eval_prompts` and their reward-adapter scores (0 without
        one), each process generating (and scoring with the reward adapter) every world-th prompt;
        gathered in the eval prompts' order."""
        chunk, world, rank = self.config.method.chunk_size, self.dist.world, self.dist.rank
        mine = list(range(rank, len(self.eval_prompt_ids), world))
        rows = []
        for start in range(0, len(mine), chunk):
            index = mine[start:start + chunk]
            rollouts = self._generate(index, gen_kwargs, self.eval_prompt_ids, self.eval_prompts)
            batch = ScoreBatch.of(rollouts, [self.eval_prompts[i].metadata for i in index])
            adapter_scores = self._reward_adapter_scores(rollouts)
            adapter_scores = [0.0] * len(index) if adapter_scores is None else adapter_scores.tolist()
            rows += zip(index, (batch[k:k + 1] for k in range(len(batch))), adapter_scores)
        rows = sorted(self.dist.gather(rows), key=lambda row: row[0])
        return ScoreBatch.concat([r[1] for r in rows]), [r[2] for r in rows]

    def save(self, path: str | None = None) -> str:
        """Write a checkpoint directory atomically (default `checkpoint_dir/step_N`, keeping the
        last `train.keep_checkpoints`); returns its path."""
        directory = os.path.join(self.run_dir, self.config.train.checkpoint_dir)
        written = checkpoint.save(self, path or os.path.join(directory, f"step_{self.step}"))
        if path is None and self.dist.is_main:
            checkpoint.prune(directory, self.config.train.keep_checkpoints)
        return written

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM set a flag that the loop honours at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            self._stop_signal = signum

        for sig in previous:
            signal.signal(sig, stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _agreed_stop_signal(self) -> int | None:
        """The signal any process has received, the same on every process: each checks at its own step
        boundary, and one stopping to save while another goes on to the next step's all-reduce would
        hang them both. With several processes, one small all-reduce a step."""
        signum = int(self.dist.max(torch.tensor([self._stop_signal or 0])).item())
        return signum or None

    def _log_rollouts(self, rollouts, scores: torch.Tensor) -> None:
        """With `train.rollout_logging_dir`: one JSON line per sample of each phase."""
        directory = self.config.train.rollout_logging_dir
        if not directory or not self.accelerator.is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"phase_{self.phase + 1}.jsonl"), "w", encoding="utf-8") as f:
            for prompt, output, score in zip(rollouts.prompts, rollouts.outputs, scores.tolist()):
                f.write(json.dumps({"step": self.step, "prompt": prompt, "output": output, "score": score}) + "\n")


@dataclass
class PhaseState:
    """A rollout phase between its rollout pass and its last optimizer step (checkpointed)."""

    exp: Experience
    batches: list[torch.Tensor]  # sample indices of each optimizer step, all PPO epochs in order
    cursor: int  # optimizer steps of this phase already taken
    stats: dict[str, float]  # the phase's rollout statistics, logged when it completes
    t_update: float  # when its PPO epochs started (perf_counter)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, signum: int, checkpoint_path: str):
        super().__init__(f"stopped by signal {signum}; checkpoint at {checkpoint_path}; continue with "
                         f"train.resume_from_checkpoint={checkpoint_path} (rlora train ... --resume latest)")
        self.signum, self.checkpoint_path = signum, checkpoint_path


def add_scores(fn_scores: torch.Tensor | None, adapter_scores: torch.Tensor | None,
               lengths: torch.Tensor) -> torch.Tensor:
    """reward_fn's scores plus the reward adapter's, which counts at each response's last real
    token when reward_fn's are per token. Shape: (b,) or (b, r), (b,), lengths (b,) -> as fn_scores."""
    if fn_scores is None or adapter_scores is None:
        return adapter_scores if fn_scores is None else fn_scores
    if fn_scores.dim() == 1:
        return fn_scores + adapter_scores
    rows = torch.arange(len(lengths))
    out = fn_scores.clone()
    out[rows, lengths - 1] += adapter_scores
    return out


def concat_scores(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
    """Scores of all chunks: (n,) when every chunk gave one score per sample, else (n, width).

    Shape: chunks of (b_i,) or (b_i, r_i) -> (n,) or (n, width).
    """
    if all(c.dim() == 1 for c in chunks):
        return torch.cat(chunks)
    if any(c.dim() == 1 for c in chunks):
        raise ValueError("reward_fn returned one score per sample for some batches and per-token lists for others; "
                         "return the same kind every time")
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])
