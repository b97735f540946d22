"""A TRL `GRPOConfig` (or `RLOOConfig`) as rlora's config: TRL's batch arithmetic in rlora's
global sizes, and every field set to anything but its default either carried over or refused
with the reason (docs/design.md §10).

TRL's sizes count completions per device: a microbatch is `per_device_train_batch_size`
completions on each process, an optimizer step `gradient_accumulation_steps` microbatches, and a
generation `generation_batch_size` completions lasting `steps_per_generation` microbatches,
trained `num_iterations` times. rlora's are global: `train.minibatch_size` = per device x
processes, `train.batch_size` = that x accumulation, `method.num_rollouts` = the generation's
completions, `method.ppo_epochs` = `num_iterations`. One rlora phase is one TRL generation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rlora.config.trl_names import GRPO_FIELDS

# TrainingArguments fields whose value changes nothing rlora computes or writes: the data loader's
# workers (prompts are in memory), evaluation batch sizes (evaluation generates in chunk_size),
# logging verbosity, the launcher's own settings, and what transformers' Trainer itself reads only
# from `train()`'s argument (resume_from_checkpoint); hub settings matter only with push_to_hub,
# which is refused.
NO_EFFECT = {
    "overwrite_output_dir", "do_train", "do_eval", "do_predict", "logging_dir", "logging_first_step",
    "logging_nan_inf_filter", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_drop_last",
    "per_device_eval_batch_size", "eval_accumulation_steps", "save_safetensors", "local_rank", "ddp_backend",
    "ddp_timeout", "ddp_find_unused_parameters", "ddp_broadcast_buffers", "log_level", "log_level_replica",
    "log_on_each_node", "prediction_loss_only", "label_names", "ignore_data_skip", "skip_memory_metrics",
    "hub_token", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision", "data_seed",
    "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "batch_eval_metrics",
    "eval_do_concat_batches", "project", "trackio_space_id",
    "pad_to_multiple_of", "ds3_gather_for_generation", "restore_callback_states_from_checkpoint",
    "include_for_metrics", "average_tokens_across_devices", "full_determinism", "resume_from_checkpoint",
    "disable_dropout",  # every pass of rlora's runs with dropout off, whichever value
}
# fields `to_rlora` (or the trainer and its callbacks) carries over
CARRIED = {
    "output_dir", "seed", "run_name", "report_to", "remove_unused_columns", "use_cpu", "tf32", "save_only_model",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size", "steps_per_generation",
    "logging_strategy", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "eval_strategy",
    "eval_steps", "eval_on_start", "bf16", "fp16", "model_init_kwargs", "trust_remote_code", "num_generations",
    "max_completion_length", "max_prompt_length", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "generation_kwargs", "cache_implementation", "beta", "num_iterations", "epsilon", "epsilon_high",
    "importance_sampling_level", "reward_weights", "scale_rewards", "loss_type", "mask_truncated_completions",
    "use_bias_correction_kl", "gradient_checkpointing", "shuffle_dataset", "normalize_advantages",
    "load_best_model_at_end", "max_tool_calling_iterations", "activation_checkpointing", "chat_template_kwargs",
}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")  # AdamW in torch's implementation


def refused(args: Any, defaults: Any) -> list[str]:
    """Each field `args` sets away from its default that rlora does not run, with the reason."""
    out = []
    for f in dataclasses.fields(args):
        name = f.name
        if name in NO_EFFECT or name in CARRIED or not f.init:
            continue
        value, default = getattr(args, name), getattr(defaults, name, None)
        if value == default:
            continue
        entry = GRPO_FIELDS.get(name)
        reason = entry.note if entry is not None and entry.rlora is None else \
            "a TrainingArguments setting rlora's trainer does not run (its loop is its own, docs/design.md §4)"
        out.append(f"{name}={value!r}: {reason}")
    return out


def to_rlora(args: Any, defaults: Any, *, model_path: str, positions: int | None, prompts: int,
             estimator: str) -> dict:
    """rlora's config (a dict for `rlora.load_config`) of the TRL arguments `args`, for a run
    over `prompts` training prompts on a model of `positions` positions; raises naming every
    field rlora does not run (`refused`)."""
    problems = refused(args, defaults) + _unsupported_values(args)
    if problems:
        raise ValueError("rlora does not run these TRL settings:\n  - " + "\n  - ".join(problems))
    world, G, per_device = args.world_size, args.num_generations, args.per_device_train_batch_size
    minibatch = per_device * world
    batch = minibatch * args.gradient_accumulation_steps
    if args.steps_per_generation % args.gradient_accumulation_steps:
        raise ValueError(f"steps_per_generation={args.steps_per_generation} is no multiple of "
                         f"gradient_accumulation_steps={args.gradient_accumulation_steps}: an optimizer step would "
                         "span two generations, which rlora's phases do not; make it a multiple")
    new_tokens = args.max_completion_length
    seq_length = (args.max_prompt_length + new_tokens) if args.max_prompt_length else positions
    if seq_length is None:
        raise ValueError("the model's config names no maximum number of positions; set max_prompt_length")
    steps_per_epoch = epoch_steps(args, prompts)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    gen_kwargs = {"max_new_tokens": new_tokens, "do_sample": True, "temperature": args.temperature,
                  "top_p": args.top_p, "top_k": args.top_k, **({"min_p": args.min_p} if args.min_p is not None else {}),
                  **({"repetition_penalty": args.repetition_penalty} if args.repetition_penalty != 1.0 else {}),
                  **({"cache_implementation": args.cache_implementation} if args.cache_implementation else {}),
                  **(args.generation_kwargs or {})}
    model_kwargs = dict(args.model_init_kwargs or {})
    dtype = model_kwargs.pop("dtype", model_kwargs.pop("torch_dtype", "float32"))
    return {
        "train": {"seq_length": seq_length, "total_steps": total, "batch_size": batch, "minibatch_size": minibatch,
                  "seed": args.seed, "run_dir": args.output_dir, "checkpoint_dir": ".",
                  "checkpoint_prefix": "checkpoint-",
                  "checkpoint_interval": _interval(args.save_strategy, args.save_steps, steps_per_epoch, total),
                  "keep_checkpoints": args.save_total_limit or 10 ** 6, "save_best": False,
                  "save_optimizer": not args.save_only_model,
                  "eval_interval": _interval(args.eval_strategy, args.eval_steps or args.logging_steps,
                                             steps_per_epoch, total),
                  "eval_at_start": bool(args.eval_on_start),
                  "float32_matmul_precision": None if args.tf32 is None else "high" if args.tf32 else "highest",
                  "tracker": _tracker(args.report_to), "run_name": args.run_name,
                  "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
                  "max_grad_norm": args.max_grad_norm or None},
        "model": {"model_path": model_path, "dtype": str(dtype).removeprefix("torch."),
                  "gradient_checkpointing": bool(args.gradient_checkpointing),
                  "model_extra_configs": model_kwargs, "trust_remote_code": args.trust_remote_code},
        "tokenizer": {"truncation_side": "left", "add_special_tokens": False,
                      "chat_template_kwargs": _as_dict(args.chat_template_kwargs, "chat_template_kwargs")},
        "optimizer": {"name": "adamw", "kwargs": {"lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2],
                                                  "eps": args.adam_epsilon, "weight_decay": args.weight_decay}},
        "scheduler": {"name": "transformers", "kwargs": {
            "type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "num_warmup_steps": args.get_warmup_steps(total),
            **({"scheduler_specific_kwargs": args.lr_scheduler_kwargs} if args.lr_scheduler_kwargs else {})}},
        "method": {"name": "GRPOConfig", "num_rollouts": args.generation_batch_size, "num_generations": G,
                   "chunk_size": args.generation_batch_size, "ppo_epochs": args.num_iterations,
                   "advantage_estimator": estimator, "scale_rewards": args.scale_rewards, "loss_type": args.loss_type,
                   "epsilon": args.epsilon, "epsilon_high": args.epsilon_high, "beta": args.beta,
                   "importance_sampling_level": args.importance_sampling_level,
                   "mask_truncated_completions": args.mask_truncated_completions,
                   "use_bias_correction_kl": args.use_bias_correction_kl,
                   # each process's microbatch of whole groups: each prompt then runs once per group
                   "shared_prefix": per_device % G == 0, "gen_kwargs": gen_kwargs},
        "task": {"reward_weights": args.reward_weights},
    }


def _unsupported_values(args: Any) -> list[str]:
    """Carried fields whose value rlora cannot carry over."""
    out = []
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OPTIMIZERS:
        out.append(f"optim={optim!r}: rlora's optimizer is torch's AdamW; use one of {', '.join(OPTIMIZERS)}")
    if not args.shuffle_dataset:
        out.append("shuffle_dataset=False: rlora draws the prompts in a fresh seeded order each pass")
    if getattr(args, "normalize_advantages", False):
        out.append("normalize_advantages=True: RLOO's advantages are the leave-one-out ones, unscaled")
    if getattr(args, "reward_clip_range", None) is not None:
        out.append("reward_clip_range: rewards are not clipped in the group methods")
    if args.load_best_model_at_end:
        out.append("load_best_model_at_end=True: the run ends with its last weights (rlora's best eval checkpoint is "
                   "train.save_best)")
    if args.push_to_hub:
        out.append("push_to_hub=True: rlora writes to output_dir only; push the saved adapter with huggingface_hub")
    if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "reduce_lr_on_plateau":
        out.append("lr_scheduler_type='reduce_lr_on_plateau': it steps on an eval metric; use a schedule over steps")
    strategies = {"steps", "no", "epoch"}
    for key in ("save_strategy", "eval_strategy", "logging_strategy"):
        value = str(getattr(getattr(args, key), "value", getattr(args, key)))
        if value not in strategies:
            out.append(f"{key}={value!r}: use 'steps', 'epoch' or 'no'")
    return out


def epoch_steps(args: Any, prompts: int) -> int:
    """Optimizer steps in one pass over `prompts` prompts, as TRL 1.16 counts them: whole
    generations of `generation_batch_size / num_generations` prompts (a partial one is dropped),
    each trained `num_iterations` times in `steps_per_generation / gradient_accumulation_steps`
    steps."""
    generations = prompts // (args.generation_batch_size // args.num_generations)
    return generations * args.num_iterations * args.steps_per_generation // args.gradient_accumulation_steps


def _interval(strategy: Any, steps: float | None, steps_per_epoch: int, total: int) -> int:
    """Optimizer steps between checkpoints or evaluations, as TRL's `*_strategy` and `*_steps`
    say (a `steps` below 1 is a fraction of the run)."""
    strategy = str(getattr(strategy, "value", strategy))
    if strategy == "no" or steps is None:
        return 10 ** 9
    if strategy == "epoch":
        return max(1, steps_per_epoch)
    return max(1, math.ceil(steps * total)) if steps < 1 else int(steps)


def _as_dict(value: dict | str | None, name: str) -> dict:
    """A dict field's value, or None as {}. GRPOConfig has already read a JSON object's text
    (`_VALID_DICT_FIELDS`), so a string here is none."""
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name}={value!r} is no JSON object; give a dict of keyword arguments")
    return dict(value or {})


def _tracker(report_to: Any) -> str | None:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", None)]
    if not names:
        return None
    if names == ["all"]:
        names = ["tensorboard"]
    if len(names) > 1 or names[0] not in ("tensorboard", "wandb"):
        raise ValueError(f"report_to={report_to!r}: rlora logs to one tracker, 'tensorboard' or 'wandb' (and "
                         "metrics.jsonl always)")
    return names[0]
