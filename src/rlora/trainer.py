"""The trainer: one visible loop over rollout phases for every method (docs/design.md §4, §5, §6).

`Trainer.learn` reads top to bottom: rollouts and rewards, reward processing, the rollout pass,
advantages, the optimizer steps, the end of the phase, evaluation, checkpoints. What differs
between PPO and the group methods lives in one method object (`rlora.methods`), chosen once from
`method.name`; the loop calls the same functions of it for every method and holds no branch on
which one runs. The run's state is `rlora.state.RunState`, which checkpoints save and restore.

Notation: `n` samples of a phase on this process, `N` on every process.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerState

from rlora import checkpoint, zero
from rlora.algo import nan_moments
from rlora.config import Config, config_to_dict, rollout_gen_kwargs
from rlora.distributed import Processes, make_accelerator, track_wrapper
from rlora.environments import Agent
from rlora.evaluation import Evaluation, show
from rlora.gradients import gradients_for
from rlora.methods import build_method
from rlora.methods.base import shares_of
from rlora.models import Policy
from rlora.models.checkpointing import checkpointing, enable as enable_checkpointing
from rlora.models.loading import check_positions
from rlora.models import sharding
from rlora.optim import build_optimizer, build_scheduler, default_run_dir
from rlora.rollout.episodes import EpisodeRunner, check_turns_agree, environment_rewards, episode_stats, \
    with_environment_rewards
from rlora.rollout.generation import Rollouts, sampling_temperature
from rlora.rollout.prompts import Prompt, PromptLoader, bind_template_variables, normalize_prompts, tokenize_prompts
from rlora.rollout.rewards import RewardFunctions, ScoreBatch, add_scores, check_reward_given
from rlora.rollout.sampler import Sampler
from rlora.rollout.store import Experience, Scored
from rlora.signals import TrainingInterrupted, stop_on_signals
from rlora.state import PhaseState
from rlora.tracking import Tracker, console, log_rollouts, plot_history


class Trainer:
    """PPO or a group method on a `Policy` whose roles share one base. Compose it; do not subclass it."""

    def __init__(self, config: Config, policy: Policy, tokenizer, reward_fn: Callable | list[Callable] | None,
                 prompts: list[Prompt], eval_prompts: list[Prompt], metric_fn: Callable | None = None,
                 stop_sequences: list[str] | None = None, accelerator: Accelerator | None = None,
                 verbose: bool = True, agent: Agent | None = None):
        check_reward_given(reward_fn, policy.has_reward_adapter, agent is not None and bool(agent.factories))
        self.config, self.tokenizer, self.policy = config, tokenizer, policy
        bind_template_variables(tokenizer, config.tokenizer.chat_template_kwargs)
        self.reward_fn = reward_fn if reward_fn is None or isinstance(reward_fn, RewardFunctions) else \
            RewardFunctions(reward_fn, config.task.reward_weights)
        self.metric_fn, self.verbose = metric_fn, verbose
        train = config.train
        self.accelerator = accelerator or make_accelerator(mixed_precision=train.mixed_precision)
        self.dist = Processes(self.accelerator)
        # num_rollouts, batch_size and minibatch_size are global: each process takes its share
        self.method = build_method(config.method, train.batch_size)
        self.method.check_policy(policy)
        self.layout = self.method.layout(self.dist, train)
        deepspeed = zero.plugin(self.accelerator)
        zero3 = deepspeed is not None and zero.stage(deepspeed) == 3  # the weights partitioned
        if deepspeed is not None:  # its batch fields and clipping from rlora's config, before prepare reads them
            zero.configure(deepspeed, self.layout.batch_size, self.layout.minibatch_size, self.dist.world,
                           train.max_grad_norm)
        if zero3:
            zero.check_partitionable(config, policy)
        check_positions(train.seq_length, policy.base_model.config)
        self.checkpointing = config.model.gradient_checkpointing
        if self.checkpointing:
            enable_checkpointing(policy.base_model)
        set_seed(train.seed, device_specific=True)  # each process samples differently; weights were seeded alike
        if not zero3:  # the head's one check runs the model (`chunked_head`): whole, before FSDP2 shards it
            policy.chunked_head()
        self.sharded = train.fsdp or sharding.fsdp_plugin(self.accelerator) is not None
        if self.sharded:  # FSDP2, in place and before the optimizer, which must hold the sharded parameters
            sharding.check_shardable(config, policy, self.dist.world)
            sharding.shard_policy(policy, **sharding.shard_options(self.accelerator))
        self.optimizer = build_optimizer(config, policy.trainable_parameters())
        scheduler = build_scheduler(config, self.optimizer)
        if self.sharded and sharding.fsdp_plugin(self.accelerator) is None:  # accelerate would wrap the model in DDP
            self.model, self.optimizer = policy, self.accelerator.prepare(self.optimizer)
        else:  # accelerate's FSDP2 plugin keeps a module that is sharded already as it is
            if self.dist.world > 1 and not self.sharded:  # DDP syncs the trainable parameters only
                frozen = [name for name, p in policy.named_parameters() if not p.requires_grad]
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(policy, frozen)
            self.model, self.optimizer = self.accelerator.prepare(policy, self.optimizer)
            track_wrapper(self.model)  # leave_process_group frees its reducer before the group ends
        self.gradients = gradients_for(self.accelerator, self.model, self.optimizer, policy.trainable_parameters,
                                       self.sharded, train.max_grad_norm, self.dist)
        # train.batch_size is global, so the schedule advances once per optimizer step on any number of
        # processes; prepare() would wrap it with split_batches=False and step it once per process
        self.scheduler = AcceleratedScheduler(scheduler, self.optimizer, split_batches=True)
        # with an agent each sample is a multi-turn episode (docs/design.md §11); the loop is the same
        if agent is not None and stop_sequences:
            raise ValueError(f"stop_sequences {stop_sequences} cut single completions; an episode's turns end at the "
                             "chat template's end of turn. Drop stop_sequences (or task.stop_sequences)")
        if agent is not None:  # sharded weights need every process in each forward
            check_turns_agree(agent, self.dist.world, self.sharded or zero3)
        episodes = None if agent is None else EpisodeRunner(agent, tokenizer, train.seq_length)
        self.sampler = Sampler(policy, tokenizer, self.accelerator, config.model, list(stop_sequences or []),
                               self.layout.minibatch_size, share_prompts=self.method.shares_prompts,
                               episodes=episodes)
        self.temperature = sampling_temperature(rollout_gen_kwargs(config.method))  # every pass scores what was sampled
        self._tokenize_prompts(prompts, eval_prompts)

        # the prompt order and the batch shuffle are the same on every process
        self.state = self.method.run_state(PromptLoader(len(prompts), train.seed),
                                           torch.Generator().manual_seed(train.seed), default_run_dir(config))
        resumed = None
        if train.resume_from_checkpoint:
            resumed = checkpoint.resolve(train.resume_from_checkpoint, self.run_dir if train.run_dir else None,
                                         train.checkpoint_dir, train.checkpoint_prefix)
            checkpoint.load(resumed, self.state, self._parts())  # restores run_dir too, unless train.run_dir names one
        self.tracker = Tracker(self.run_dir, train.tracker, config_to_dict(config), train.project_name,
                               train.entity_name, train.group_name, train.tags,
                               enabled=self.accelerator.is_main_process, history=self.history if resumed else None,
                               run_name=train.run_name)
        self.total_steps = self._total_steps()
        # what TRL-style reward functions get as `trainer_state` (global_step: optimizer steps done)
        self.trainer_state = TrainerState(max_steps=self.total_steps)
        self.evaluation = Evaluation(self.sampler, self.reward_fn, metric_fn, self.eval_prompts, self.eval_prompt_ids,
                                     config.method, self.dist, self.trainer_state) if eval_prompts else None
        self.observers: list[Callable[..., None]] = []  # called with each event of the run (`_notify`)
        self.stop_requested = False  # set by an observer: the run ends after the current step
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ the loop
    def learn(self) -> "Trainer":
        """Train until `train.total_steps` optimizer steps (or `train.epochs` rollout phases, when set).

        SIGINT / SIGTERM (to any one process or to all) save a checkpoint at the next step boundary,
        then raise `TrainingInterrupted`; `train.resume_from_checkpoint` continues from it exactly.
        """
        train, method, state = self.config.train, self.method, self.state
        self.model.eval()  # dropout off in every pass of the loop, so the ratio starts at 1 (docs/design.md §1)
        self._notify("train_begin")
        if state.step == 0 and not state.history and train.eval_at_start:
            self.evaluate()  # the baseline, before any update
        progress = self._progress()
        task = progress.add_task(self.config.method.name.removesuffix("Config"), total=self.total_steps,
                                 completed=state.step, reward=float("nan"))
        with progress, stop_on_signals(self._on_signal):
            while state.step < self.total_steps:
                if state.pending is None:
                    t0 = time.perf_counter()
                    # 1. Rollouts: chunk_size completions at a time (whole groups of num_generations)
                    #    until this process has its share of num_rollouts; each process takes its slice
                    #    of the same prompt chunks; the method's draw policy keeps what it trains on
                    #    (DAPO's dynamic sampling drops groups of equal rewards and draws more)
                    # 2. Rewards of each chunk: the reward function(s) (validated; several: their weighted
                    #    sum), once on the main process for every process's samples unless
                    #    train.reward_on_all_ranks, plus the reward adapter's score; shaped by the method
                    phase, stats = self._collect()
                    if self.dist.is_main:
                        log_rollouts(train.rollout_logging_dir, state.phase + 1, state.step, phase.rollouts,
                                     phase.scores)
                    t_rollout = time.perf_counter()

                    # 3. Reward processing over every process's samples (PPO: running moments, scale, clip)
                    score_sums = self.dist.all_values(phase.scores.sum(1) if phase.scores.dim() == 2
                                                      else phase.scores)  # (N,)
                    scores = method.shape_phase(phase.scores, score_sums, state)

                    # 4. One no-grad rollout pass with the passes the method needs (old log-probs,
                    #    values, the reference), over the minibatches of the first epoch, so that
                    #    epoch's first minibatch sees exactly its layout (ratio exactly 1)
                    orders = [method.order(len(phase), state.shuffle) for _ in range(self.config.method.ppo_epochs)]
                    exp = self._rollout_pass(phase.rollouts, orders[0])

                    # 5. Advantages (and returns): PPO's GAE over −β·KL rewards, or each group's own
                    stats.update(method.advantages(exp, scores, score_sums, state, self.dist))
                    stats.update({"time/rollout": t_rollout - t0, "time/rollout_pass": time.perf_counter() - t_rollout})
                    # the phase's rollouts are logged now, with its first step: a run that stops mid-phase has them
                    record = self._record(stats, step=state.step + 1, phase=state.phase + 1)
                    self._notify("phase", record=record)
                    batches = [batch for order in orders for batch in order.split(self.layout.batch_size)]
                    state.pending = PhaseState(exp, batches, 0, record)

                # 6. ppo_epochs passes over the shuffled experience, batch_size samples per optimizer
                #    step, resuming where a checkpoint left the phase
                pending = state.pending
                while pending.cursor < len(pending.batches) and state.step < self.total_steps:
                    self._notify("step_begin")
                    t0 = time.perf_counter()
                    stats = self.train_step(pending.exp, pending.batches[pending.cursor])
                    pending.cursor += 1
                    state.step += 1
                    self._notify("step", record=self._record({**stats, "time/step": time.perf_counter() - t0}))
                    progress.update(task, completed=state.step, reward=pending.stats[method.progress_key])
                    if state.step % train.eval_interval == 0:
                        self.evaluate()
                    if state.step % train.checkpoint_interval == 0 and state.step < self.total_steps:
                        self.save()
                    signum, stop = self._agreed_stops()
                    if signum is not None:
                        raise TrainingInterrupted(signum, self.save())
                    if stop:  # an observer asked (a callback's should_training_stop)
                        break
                if self.stop_requested:
                    break

                # 7. The end of a phase (PPO: the KL controller on its mean KL)
                if pending.cursor == len(pending.batches):
                    method.end_phase(pending.stats, state)
                    state.phase += 1
                    state.pending = None

        # 8. Checkpoint and evaluate at the end (saved before an eval that an uninterrupted longer
        #    run would not do, so resuming with a larger train.total_steps continues exactly)
        self.save()
        if not any(r.get("eval") and r["step"] == state.step for r in state.history[-3:]):
            self.evaluate()
        if self.dist.is_main:
            plot_history(state.history, self.run_dir)
        self._notify("train_end")
        self.tracker.close()
        self.accelerator.wait_for_everyone()  # no process exits while another still works
        return self

    # ------------------------------------------------------------------ pieces of the loop
    @torch.no_grad()
    def _collect(self) -> tuple[Scored, dict[str, Any]]:
        """Steps 1 and 2: this process's share of `num_rollouts`, generated and rewarded, and their
        statistics (over every process). Every process draws its slice of the same prompt chunks."""
        draws = self.method.rollouts(self.layout, self.dist, self.tokenizer.pad_token_id)
        config = self.config.method
        while (size := draws.next_size()) > 0:
            index = self.state.loader.next_chunk(size * self.dist.world)[self.dist.rank * size:][:size]
            rollouts = self.sampler.generate(index, rollout_gen_kwargs(config), self.prompt_ids, self.prompts,
                                             merged=config.merge_adapter_for_generation,
                                             num_generations=self.method.num_generations,
                                             recast=True)
            draws.add(self.method.shape_chunk(self._rewards(index, rollouts)))
        phase = draws.phase()
        stats: dict[str, Any] = self.logged_by_reward_functions()
        for name, values in phase.values.items():  # each reward function's own mean and std over what it judged
            stats.update({f"rewards/{name}/{k}": v for k, v in nan_moments(self.dist.all_values(values)).items()})
        return phase, {**stats, **self.method.phase_stats(phase, self.dist), **draws.stats(self.dist),
                       **episode_stats(phase.rollouts, self.dist)}

    def _rewards(self, index: list[int], rollouts: Rollouts) -> Scored:
        """The rewards of one chunk (generated from the prompts at `index`): reward functions plus
        the reward adapter."""
        metadata = [self.prompts[i].metadata for i in index for _ in range(self.method.num_generations)]
        self.trainer_state.global_step = self.state.step
        here = self.config.train.reward_on_all_ranks or rollouts.episodes is not None  # environments stay here
        fn_scores, values = (None, {}) if self.reward_fn is None else self.dist.score(
            self.reward_fn, ScoreBatch.of(rollouts, metadata), self.tokenizer, here, self.trainer_state)
        if rollouts.episodes is not None and fn_scores is not None and fn_scores.dim() == 2:
            raise ValueError("reward_fn returned per-token scores for multi-turn episodes; score each episode with "
                             "one number (the environment's tokens between turns are no actions to score)")
        fn_scores, values = with_environment_rewards(fn_scores, values, environment_rewards(rollouts))
        scores = add_scores(fn_scores, self.sampler.reward_adapter_scores(rollouts), rollouts.response_mask.sum(1))
        if scores is None:
            raise ValueError("no reward: the episodes' environments have no get_reward() and no reward function was "
                             "given; give the environment a get_reward() method, or pass reward_fn")
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

    @torch.no_grad()
    def _rollout_pass(self, rollouts: Rollouts, order: torch.Tensor) -> Experience:
        """Step 4 over all samples in `order`, `minibatch_size` at a time (memory bounded by it),
        running only the passes the method needs (`method.passes`).

        Returns the experience with old logprobs, values and reference logprobs filled in
        (advantages and returns still zero; what no pass computed stays zero).
        """
        n, r = rollouts.response_ids.shape
        exp = Experience(rollouts.query_ids, rollouts.query_mask, rollouts.response_ids, rollouts.response_mask,
                         logprobs=torch.zeros(n, r), values=torch.zeros(n, r), advantages=torch.zeros(n, r),
                         returns=torch.zeros(n, r), ref_logprobs=torch.zeros(n, r),
                         loss_mask=self.method.loss_mask(rollouts), action_mask=rollouts.action_mask.clone())
        passes = self.method.passes
        if not (passes.old_logprobs or passes.reference):
            return exp
        for index in order.split(self.layout.minibatch_size):
            mb = exp.select(index).to(self.accelerator.device)
            with self.sampler.precision():  # the reference in the policy's precision, as the update's forward
                out = sharding.run_through(self.model, lambda: self.method.forward(  # sharded: root gathered
                    self.policy, self.policy, mb, self.temperature, with_reference=passes.reference,
                    with_policy=passes.old_logprobs))
            width = mb.response_ids.shape[1]
            for name in ("logprobs", "values", "ref_logprobs"):
                if getattr(out, name) is not None:
                    getattr(exp, name)[index, :width] = getattr(out, name).float().cpu()
        return exp

    def train_step(self, exp: Experience, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimizer step on the samples `batch` of `exp`, split into microbatches.

        Each microbatch's loss is weighted by its share of the batch (`method.step_shares`), so
        the step's gradient does not depend on `minibatch_size`, unequal last microbatches
        included. Stats are detached tensors: the step's value of each is the loss-token-weighted
        mean of its microbatches' (a max where its name says "max"); `loss` is the step's loss.
        """
        micro = batch.split(self.layout.minibatch_size)
        shares, tokens, step_tokens = self.method.step_shares(exp, batch, micro, self.dist)
        stats: list[dict[str, torch.Tensor]] = []
        for i, index in enumerate(micro):
            mb = exp.select(index).to(self.accelerator.device)
            last = i == len(micro) - 1
            with self.gradients.microbatch(last):  # one gradient all-reduce (reduce-scatter) a step
                # the shared-prefix pass calls the model's parts, not its forward: precision and
                # activation checkpointing (model.gradient_checkpointing) are set around it
                with self.sampler.precision(), checkpointing(self.policy.base_model, self.checkpointing):
                    out = self.method.forward(self.model, self.policy, mb, self.temperature,
                                              with_entropy=self.method.with_entropy)
                loss, step_stats = self.method.loss(out, mb, step_tokens)
                loss = loss * shares[i]
                self.gradients.backward(loss, last)
            stats.append({"loss": loss.detach(), **step_stats})
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses, before the schedule moves on
        grad_norm, finite = self._optimizer_step(torch.stack([s["loss"] for s in stats]).sum())
        weights = torch.tensor(shares_of(tokens), dtype=torch.float64)
        out = {key: torch.stack([s[key] for s in stats]).double().cpu().max().float() if "max" in key else
               (torch.stack([s[key] for s in stats]).double().cpu() * weights).sum().float() for key in stats[0]}
        out["loss"] = torch.stack([s["loss"] for s in stats]).sum()  # each was scaled to its share of the step
        return {**out, "skipped": float(not finite), "grad_norm": grad_norm, "learning_rate": learning_rate}

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The gradient's norm, clipped to `train.max_grad_norm` when set, and the optimizer and
        schedule step (`rlora.gradients`). A non-finite loss or gradient never reaches the weights;
        `train.max_bad_steps` skipped steps in a row stop the run. Returns the norm and whether the
        step was taken."""
        train, state = self.config.train, self.state
        norm, finite = self.gradients.step(loss)
        if finite:
            self.scheduler.step()
            state.bad_steps = 0
        else:
            state.bad_steps += 1
            if state.bad_steps >= train.max_bad_steps:
                raise FloatingPointError(
                    f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient (last at step "
                    f"{state.step + 1}); the weights were not updated by them. Lower the learning rate, check "
                    "reward_fn for extreme scores, or raise train.max_bad_steps.")
            warnings.warn(f"step {state.step + 1}: non-finite loss or gradient; step skipped "
                          f"({state.bad_steps} in a row, train.max_bad_steps={train.max_bad_steps})")
        return norm, finite

    def _record(self, stats: dict[str, torch.Tensor | float], **extra: Any) -> dict[str, Any]:
        """Reduce statistics to floats once and log them (`step` in `extra` overrides the run's)."""
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).cpu().reshape(()) for k in keys])
        if not extra.get("eval"):  # per-process step statistics -> the run's (eval stats are global already)
            values = torch.where(torch.tensor(["max" in k for k in keys]), self.dist.max(values),
                                 self.dist.mean(values))
        record = {"step": self.state.step, **extra, **dict(zip(keys, values.tolist()))}
        self.state.history.append(record)
        self.tracker.log(record)
        return record

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("reward {task.fields[reward]:.3f}"),
                        console=console, disable=not (self.verbose and self.dist.is_main))

    def _tokenize_prompts(self, prompts: list[Prompt], eval_prompts: list[Prompt]) -> None:
        """Token ids of the prompts, each within `seq_length` minus the most new tokens it gets."""
        train, method, special = self.config.train, self.config.method, self.config.tokenizer.add_special_tokens
        max_new = rollout_gen_kwargs(method)["max_new_tokens"]
        max_new_eval = max(kwargs.get("max_new_tokens", method.gen_kwargs["max_new_tokens"])
                           for kwargs in [method.gen_kwargs, *method.eval_gen_kwargs.values()])
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.prompt_ids = tokenize_prompts(prompts, self.tokenizer, train.seq_length - max_new, "prompts", special)
        if max_new_eval == max_new and eval_prompts == prompts[:len(eval_prompts)]:
            self.eval_prompt_ids = self.prompt_ids[:len(eval_prompts)]  # the default: tokenized (and warned) once
        else:
            self.eval_prompt_ids = tokenize_prompts(eval_prompts, self.tokenizer, train.seq_length - max_new_eval,
                                                    "eval_prompts", special)

    def _total_steps(self) -> int:
        """`train.total_steps`, or fewer where `train.epochs` caps the rollout phases (warned)."""
        train, method = self.config.train, self.config.method
        steps_per_phase = method.ppo_epochs * math.ceil(method.num_rollouts / train.batch_size)
        if train.epochs is None or train.epochs * steps_per_phase >= train.total_steps:
            return train.total_steps
        warnings.warn(f"train.epochs={train.epochs} rollout phases of {steps_per_phase} optimizer steps each allow "
                      f"{train.epochs * steps_per_phase} optimizer steps, fewer than train.total_steps="
                      f"{train.total_steps}: the run stops at step {train.epochs * steps_per_phase}. Raise "
                      "train.epochs (or set it to null for no cap), or lower train.total_steps.", stacklevel=3)
        return train.epochs * steps_per_phase

    def _notify(self, event: str, **data: Any) -> None:
        """Tell the observers (`self.observers`) of an event of the run: "train_begin", "phase" and
        "step" (their records), "step_begin", "evaluate" (its record), "save" (the path),
        "train_end". They watch; the loop waits on them for nothing, and only `stop_requested`
        (which ends the run after the current step, saved and evaluated as any end) reaches it."""
        for observer in self.observers:
            observer(event, **data)

    def _parts(self) -> checkpoint.Parts:
        return checkpoint.Parts(self.policy, self.tokenizer, self.optimizer, self.scheduler, self.config, self.dist,
                                self.accelerator.device)

    # ------------------------------------------------------------------ the run, and public helpers
    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.state.step

    @property
    def phase(self) -> int:
        """Rollout phases completed."""
        return self.state.phase

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every logged record (`metrics.jsonl`)."""
        return self.state.history

    @property
    def run_dir(self) -> str:
        return self.state.run_dir

    def generate(self, prompts: list[str], **gen_kwargs) -> list[str]:
        """Outputs (generated text only) of the policy for `prompts`, with `method.gen_kwargs`
        updated by `gen_kwargs`."""
        gen_kwargs = {**self.config.method.gen_kwargs, **gen_kwargs}
        items = normalize_prompts(prompts)
        ids = tokenize_prompts(items, self.tokenizer, self.config.train.seq_length - gen_kwargs["max_new_tokens"],
                               add_special_tokens=self.config.tokenizer.add_special_tokens)
        chunk = self.config.method.chunk_size
        return [output for start in range(0, len(ids), chunk)
                for output in self.sampler.generate(list(range(start, min(start + chunk, len(ids)))), gen_kwargs,
                                                    ids, items).outputs]

    def evaluate(self) -> dict[str, Any]:
        """Generate for `eval_prompts` with `method.gen_kwargs` (and each `eval_gen_kwargs`
        variant); log the reward and `metric_fn` means, and keep the best checkpoint
        (`train.save_best`)."""
        state = self.state
        if self.evaluation is None:  # no eval prompts: a run without evaluation
            return {}
        self.trainer_state.global_step = state.step
        stats, tables = self.evaluation(state.step)
        record = self._record(stats, eval=True)
        self._notify("evaluate", record=record)
        if self.config.train.save_best and state.step > 0 and stats["reward/mean"] > state.best_reward:
            state.best_reward = stats["reward/mean"]
            self.save(os.path.join(self.run_dir, self.config.train.checkpoint_dir, "best"))
        if self.verbose and self.dist.is_main:
            show(tables, state.step, stats)
        return record

    def save(self, path: str | None = None) -> str:
        """Write a checkpoint directory atomically (default `checkpoint_dir/step_N`, keeping the
        last `train.keep_checkpoints`); returns its path."""
        directory = os.path.join(self.run_dir, self.config.train.checkpoint_dir)
        prefix = self.config.train.checkpoint_prefix
        written = checkpoint.save(path or os.path.join(directory, f"{prefix}{self.state.step}"), self.state,
                                  self._parts())
        if path is None and self.dist.is_main:
            checkpoint.prune(directory, self.config.train.keep_checkpoints, prefix)
        self._notify("save", path=written)
        return written

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum

    def _agreed_stops(self) -> tuple[int | None, bool]:
        """The signal any process has received, and whether any observer asked to stop, the same on
        every process: each checks at its own step boundary, and one stopping while another goes
        on to the next step's all-reduce would hang them both. With several processes, one small
        all-reduce a step."""
        signum, stop = self.dist.max(torch.tensor([self._stop_signal or 0, int(self.stop_requested)])).tolist()
        self.stop_requested = bool(stop)
        return int(signum) or None, bool(stop)


PPOTrainer = Trainer  # trlx's name; the one trainer runs every method
