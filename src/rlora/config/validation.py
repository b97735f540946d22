"""Validation: types at every depth, unknown keys with a suggestion, and cross-field checks that
run before any model is loaded and name the key to change. Everything here checks; building
sections from data is `rlora.config.parse`'s."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
import warnings
from typing import Any, Callable

from rlora.config.sections import METHODS, Config, GRPOConfig, ModelConfig, PPOConfig, TrainConfig, rollout_gen_kwargs
from rlora.config.trl_names import LEGACY_VALUES, trl_key_hint

# `generate` arguments that are not GenerationConfig attributes.
_GENERATE_ONLY_KWARGS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                         "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
                         "tokenizer", "use_model_defaults"}


def check_value(tp: Any, value: Any, path: str, build: Callable[[type, dict, str], Any] | None = None) -> Any:
    """`value` checked against the annotation `tp` and returned, an int widened to float and a
    tuple made a list; else a TypeError naming the key `path` and the type to give.

    Where `tp` is a section and `value` a mapping, `build(tp, value, path)` makes the section:
    parsing passes its builder, a check of a built config passes none.
    """
    if tp is Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args or Any in args:
            return value
        for arg in args:
            if arg is not type(None):
                try:
                    return check_value(arg, value, path, build)
                except TypeError:
                    pass
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict) and build is not None:
            return build(tp, value, path)
    elif typing.get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [check_value(item, v, f"{path}[{i}]", build) for i, v in enumerate(value)]
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    expected = str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    raise TypeError(f"{path}={value!r} has type {type(value).__name__}, expected {expected}; "
                    f"give {path} a value of type {expected}")


def unknown_key(full: str, valid: typing.Iterable[str]) -> ValueError:
    """The error for key `full` (dotted) that is not one of `valid`: the closest valid key, else all of them."""
    parent, _, key = full.rpartition(".")
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = (f"did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close
            else f"valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}")
    return ValueError(f"unknown config key '{full}'; {hint}")


def unknown_section_key(cls: type, full: str, valid: typing.Iterable[str]) -> ValueError:
    """The error for key `full` that section `cls` lacks: the other method's key, TRL's name for
    an rlora setting (its equivalent, not a spelling guess), else a "did you mean"."""
    if cls in METHODS.values():
        _refuse_other_methods_key(cls, full)
    trl_hint = trl_key_hint(full)
    return ValueError(trl_hint) if trl_hint else unknown_key(full, valid)


def method_class(name: Any) -> type:
    """The method section that `method.name` selects (PPOConfig or GRPOConfig, any case)."""
    cls = METHODS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"method.name={name!r} is not a method rlora has; use 'PPOConfig' (PPO with a critic) or "
                         "'GRPOConfig' (the group methods: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO)")
    return cls


def _refuse_other_methods_key(cls: type, full: str) -> None:
    """A key of the other method's section: say so, rather than only 'unknown key'."""
    key = full.rpartition(".")[2]
    for other in METHODS.values():
        if other is not cls and key in {f.name for f in dataclasses.fields(other)}:
            what = ("PPO's: the group methods have no critic, GAE or adaptive KL" if other is PPOConfig
                    else "a group-method setting, which PPO does not read")
            raise ValueError(f"{full} is a {other.__name__} key ({what}); under method.name={cls.__name__!r} "
                             f"drop it, or set method.name to {other.__name__!r}")


def is_instance(value: Any, module: str, name: str) -> bool:
    """isinstance against `module.name` without importing the (slow) module when nothing uses it."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def validate(config: Config) -> None:
    """Type and cross-field checks, run before any model is loaded; raise ValueError/TypeError naming the fix."""
    if isinstance(config.method, GRPOConfig):
        for key, mapping in LEGACY_VALUES.items():
            value = getattr(config.method, key)
            if isinstance(value, bool):
                raise ValueError(f"method.{key}={value!r} is TRL's older boolean: use {mapping[value]!r}, as TRL "
                                 "reads it")
    for name, section_cls in typing.get_type_hints(Config).items():
        section = getattr(config, name)
        if not isinstance(section, section_cls):
            expected = " or ".join(c.__name__ for c in typing.get_args(section_cls)) or section_cls.__name__
            raise TypeError(f"config.{name} is a {type(section).__name__}, expected {expected}; "
                            "build configs from dicts or YAML with rlora.config.load_config")
        for key, tp in typing.get_type_hints(type(section)).items():
            check_value(tp, getattr(section, key), f"{name}.{key}")
    _validate_train(config.train)
    _validate_model(config.model)
    _validate_quantization(config.model, config.method)
    if config.train.fsdp:
        _validate_sharding(config)
    if isinstance(config.method, GRPOConfig):
        _validate_group_method(config.method, config)
    else:
        _validate_method(config.method, config.train.seq_length)
    _check(config.tokenizer.padding_side in ("left", "right"), "tokenizer.padding_side",
           config.tokenizer.padding_side, "set it to 'left' or 'right'")
    _check(config.tokenizer.truncation_side in ("left", "right"), "tokenizer.truncation_side",
           config.tokenizer.truncation_side, "set it to 'left' or 'right'")
    opt = config.optimizer
    _check(opt.name != "adamw_8bit_bnb", "optimizer.name", opt.name,
           "bitsandbytes optimizers are not supported; use 'adamw' (LoRA adapters keep optimizer state small)")
    _check(opt.name in ("adamw", "adam", "sgd"), "optimizer.name", opt.name, "use one of 'adamw', 'adam', 'sgd'")
    lr = opt.kwargs.get("lr")
    _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, "optimizer.kwargs.lr", lr,
           "set a positive learning rate, e.g. optimizer.kwargs.lr=3.0e-5")
    _check(config.scheduler.name in ("cosine_annealing", "linear", "constant", "transformers"), "scheduler.name",
           config.scheduler.name, "use one of 'cosine_annealing', 'linear', 'constant', 'transformers'")
    if config.scheduler.name == "transformers":
        extra = sorted(set(config.scheduler.kwargs) - {"type", "num_warmup_steps", "scheduler_specific_kwargs"})
        _check(not extra, "scheduler.kwargs", config.scheduler.kwargs,
               f"transformers' get_scheduler takes type, num_warmup_steps and scheduler_specific_kwargs, not {extra}")
        _check(config.scheduler.kwargs.get("type") != "reduce_lr_on_plateau", "scheduler.kwargs.type",
               "reduce_lr_on_plateau", "it steps on an eval metric, which rlora's loop does not feed it; use a "
               "schedule over steps (linear, cosine, constant_with_warmup, ...)")


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {fix}")


def _validate_train(t: TrainConfig) -> None:
    _check(t.trainer in ("AcceleratePPOTrainer", "PPOTrainer"), "train.trainer", t.trainer,
           "rlora has one trainer for every method (method.name chooses PPO or a group method); set "
           "train.trainer to 'AcceleratePPOTrainer'")
    _check(t.pipeline == "PromptPipeline", "train.pipeline", t.pipeline, "only 'PromptPipeline' is supported")
    _check(not t.trainer_kwargs, "train.trainer_kwargs", t.trainer_kwargs,
           "rlora's PPO trainer takes no extra arguments (trlx passed these to its trainer class); set it to {}")
    for key in ("seq_length", "total_steps", "batch_size", "checkpoint_interval", "eval_interval",
                "keep_checkpoints", "max_bad_steps"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "it must be at least 1")
    _check(t.epochs is None or t.epochs >= 1, "train.epochs", t.epochs,
           "it must be at least 1, or null for no cap on rollout phases")
    _check(t.mixed_precision in (None, "no", "bf16", "fp16"), "train.mixed_precision", t.mixed_precision,
           "use 'bf16' (bf16 autocast, fp32 weights), 'no', 'fp16' (GPUs) or null for accelerate's setting")
    _check(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm,
           "set a positive norm (1.0 is usual), or null for no clipping")
    mb = t.minibatch_size
    _check(mb is None or 1 <= mb <= t.batch_size and t.batch_size % mb == 0, "train.minibatch_size", mb,
           f"it must divide train.batch_size={t.batch_size}; set it to a divisor of {t.batch_size} or null")
    _check(t.tracker in (None, "tensorboard", "wandb"), "train.tracker", t.tracker,
           "use null, 'tensorboard' or 'wandb'")
    _check(t.num_threads is None or t.num_threads >= 1, "train.num_threads", t.num_threads,
           "set at least 1, or null for the cores divided among local processes")
    _check(t.float32_matmul_precision in (None, "highest", "high", "medium"), "train.float32_matmul_precision",
           t.float32_matmul_precision, "use 'highest', 'high', 'medium' (torch's names), or null to leave torch's setting")


def _validate_sharding(config: Config) -> None:
    """What `train.fsdp` cannot shard: FSDP2 gathers each layer from its own shard buffers in the
    layer's forward, so weights swapped in outside a forward (a merged adapter, a recast copy) are
    never what runs. (The policy's mode is checked where it is known, in the trainer.)"""
    _check(not config.method.merge_adapter_for_generation, "method.merge_adapter_for_generation", True,
           "a merge writes into weights outside a forward, which FSDP2 does not gather; set it to false under "
           "train.fsdp (the sharded sampler runs the adapter unmerged)")
    _check(config.model.generation_dtype is None, "model.generation_dtype", config.model.generation_dtype,
           "a recast copy of the weights is not what FSDP2 gathers; set it to null under train.fsdp (sample in "
           "model.dtype, or set train.mixed_precision: bf16)")


def _validate_model(m: ModelConfig) -> None:
    path_ok = isinstance(m.model_path, str) and m.model_path != ""
    _check(path_ok or is_instance(m.model_path, "transformers", "PretrainedConfig"), "model.model_path",
           m.model_path, "set model.model_path to a model directory or hub name, or to a transformers "
           "PretrainedConfig for a randomly initialised model")
    _check(m.model_arch_type == "causal", "model.model_arch_type", m.model_arch_type,
           "only 'causal' language models are supported (seq2seq is not); set it to 'causal'")
    _check(m.dtype in ("float32", "bfloat16", "auto"), "model.dtype", m.dtype,
           "use 'float32', 'bfloat16' or 'auto' (the checkpoint's own precision)")
    _check(m.generation_dtype in (None, "float32", "bfloat16"), "model.generation_dtype", m.generation_dtype,
           "use 'bfloat16' (a bf16 sampler), 'float32', or null (sample in model.dtype)")
    _check(m.attention_dtype in (None, "float32", "model"), "model.attention_dtype", m.attention_dtype,
           "use null (float32 on CPU for a bf16 model), 'float32' (always), or 'model' (the model's own precision)")
    _check(m.reference in ("base", "adapter"), "model.reference", m.reference,
           "use 'base' (the adapters switched off) or 'adapter' (a frozen copy of the adapter the policy starts from)")
    _check(m.adapter_compute_dtype in ("model", "float32"), "model.adapter_compute_dtype", m.adapter_compute_dtype,
           "use 'model' (a bf16 base's adapters compute in bf16 under autocast) or 'float32' (peft's upcast)")
    _check(m.num_layers_unfrozen >= -1, "model.num_layers_unfrozen", m.num_layers_unfrozen,
           "use -1 (all trainable), 0 (none) or N > 0 (top N blocks)")
    _check(m.peft_config is not None or m.num_layers_unfrozen != 0, "model.num_layers_unfrozen", 0,
           "without model.peft_config nothing but the value head would train; set a peft_config, -1 or N > 0")
    if m.peft_config is not None:
        _check_peft_config(m.peft_config)
    roles = [key for key in ("value_adapter", "reward_adapter") if getattr(m, key) is not None]
    for key in roles:
        _check(m.peft_config is not None or isinstance(m.model_path, str), f"model.{key}", getattr(m, key),
               "a critic or reward adapter sits beside the policy's LoRA adapter on the one base; set "
               "model.peft_config to a LoRA config (or model.model_path to a saved adapter)")
        if m.peft_config is not None:
            _check(_peft_type(m.peft_config) == "LORA", f"model.{key}", getattr(m, key),
                   f"it needs a LoRA policy adapter, not peft_type={_peft_type(m.peft_config)!r}: peft combines "
                   "adapters of one type on a model, and `rlora rm` writes LoRA; use a LoRA model.peft_config")
    if isinstance(m.value_adapter, dict) or is_instance(m.value_adapter, "peft", "PeftConfig"):
        _check_peft_config(m.value_adapter, "model.value_adapter")
        _check(_peft_type(m.value_adapter) == "LORA", "model.value_adapter.peft_type", _peft_type(m.value_adapter),
               "the critic adapter sits beside the policy's LoRA adapter; use peft_type: LORA")
        for name, default in (("modules_to_save", None), ("bias", "none"), ("trainable_token_indices", None)):
            value = (m.value_adapter.get(name, default) if isinstance(m.value_adapter, dict)
                     else getattr(m.value_adapter, name, default))
            _check(value == default, f"model.value_adapter.{name}", value,
                   f"the critic trains its LoRA weights and the value head only; leave {name} at {default!r}")
    elif m.value_adapter is not None:
        _check(isinstance(m.value_adapter, str) and m.value_adapter != "", "model.value_adapter", m.value_adapter,
               "give a LoRA config (e.g. {peft_type: LORA, r: 8}) or a reward-adapter directory")
    _check(m.reward_adapter is None or isinstance(m.reward_adapter, str) and m.reward_adapter != "",
           "model.reward_adapter", m.reward_adapter, "give the directory written by `rlora rm --out DIR`")


def _validate_quantization(m: ModelConfig, method: Any) -> None:
    """A quantized base (`model.quantization`, or bitsandbytes' `quantization_config` in
    `model.model_extra_configs`): what cannot run on it, refused with what runs instead."""
    _check(m.quantization in (None, "nf4", "fp4", "int8"), "model.quantization", m.quantization,
           "use 'nf4' or 'fp4' (a 4-bit base), 'int8', or null (unquantized)")
    extra = m.model_extra_configs.get("quantization_config")
    if m.quantization is None and extra is None:
        return
    key = "model.quantization" if m.quantization is not None else "model.model_extra_configs.quantization_config"
    value = m.quantization if m.quantization is not None else extra
    _check(extra is None or m.quantization is None, key, value,
           "model.model_extra_configs.quantization_config is set too; give one of the two")
    _check(isinstance(m.model_path, str), key, value, "a quantized base is loaded from saved weights, and "
           "model.model_path is a config object (random init); save_pretrained the model and give its directory")
    import os

    adapter = isinstance(m.model_path, str) and os.path.isfile(
        os.path.join(os.path.expanduser(m.model_path), "adapter_config.json"))
    _check(m.peft_config is not None or adapter, key, value,
           "quantized weights cannot train, and without a peft adapter the base's own blocks would "
           f"(num_layers_unfrozen={m.num_layers_unfrozen}); set model.peft_config (QLoRA), or quantization: null")
    _check(m.generation_dtype is None, key, value, f"model.generation_dtype={m.generation_dtype!r} would recast the "
           "quantized weights for sampling; set model.generation_dtype: null (rollouts sample on the quantized base "
           "with the adapter unmerged, in its compute dtype)")
    _check(not getattr(method, "merge_adapter_for_generation", False), key, value,
           "method.merge_adapter_for_generation merges the adapter into the base weights, which on a quantized base "
           "rounds the merged weight back to 4 (or 8) bits, sampling from another policy than the one scored; set it "
           "to false (the unmerged adapter samples)")


def _peft_type(value: Any) -> str | None:
    ptype = value.get("peft_type") if isinstance(value, dict) else getattr(value, "peft_type", None)
    return getattr(ptype, "value", ptype)


def _check_peft_config(value: Any, key: str = "model.peft_config") -> None:
    import peft

    if isinstance(value, dict):
        _check("peft_type" in value, key, value, "add a 'peft_type', e.g. peft_type: LORA")
        mapping = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
        ptype = getattr(value["peft_type"], "value", value["peft_type"])
        names = sorted(getattr(t, "value", t) for t in mapping)
        if ptype not in names:
            close = difflib.get_close_matches(str(ptype).upper(), names, n=1)
            raise ValueError(f"{key}.peft_type={ptype!r} is not a peft type; "
                             + (f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(names)}"))
        config_cls = mapping[ptype]
        fields = [f.name for f in dataclasses.fields(config_cls)]
        for name in value:
            if name not in fields:
                raise unknown_key(f"{key}.{name}", fields)
        try:
            value = peft.get_peft_config(dict(value))
        except (TypeError, ValueError) as err:  # unknown keys were caught above; this is peft's own check
            raise ValueError(f"{key} does not build a {config_cls.__name__}: {err}") from err
    if not isinstance(value, peft.PeftConfig):
        raise TypeError(f"{key} is a {type(value).__name__}; use a peft PeftConfig or a dict "
                        "such as {'peft_type': 'LORA', 'r': 8}")
    task_type = getattr(value, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    _check(task_type in (None, "CAUSAL_LM"), f"{key}.task_type", task_type,
           "rlora trains causal LMs; set task_type to 'CAUSAL_LM' (or leave it out)")


def _validate_method(p: PPOConfig, seq_length: int) -> None:
    _check(p.name.lower() == "ppoconfig", "method.name", p.name, "only PPO is implemented; set it to 'PPOConfig'")
    for key in ("ppo_epochs", "num_rollouts", "chunk_size"):
        _check(getattr(p, key) >= 1, f"method.{key}", getattr(p, key), "it must be at least 1")
    for key in ("gamma", "lam"):
        _check(0.0 <= getattr(p, key) <= 1.0, f"method.{key}", getattr(p, key), "it must be in [0, 1]")
    for key in ("cliprange", "cliprange_value", "cliprange_reward", "horizon"):
        _check(getattr(p, key) > 0, f"method.{key}", getattr(p, key), "it must be > 0")
    _check(p.target is None or p.target > 0, "method.target", p.target,
           "set a positive target KL for the adaptive controller, or null for a fixed coefficient")
    _check(p.init_kl_coef >= 0, "method.init_kl_coef", p.init_kl_coef, "it must be >= 0 (0 turns the KL off)")
    _check(p.vf_coef >= 0, "method.vf_coef", p.vf_coef, "it must be >= 0")
    _check(p.scale_reward in ("ignored", "running", "ref", None), "method.scale_reward", p.scale_reward,
           "use 'ignored', 'running', 'ref' or null")
    _check(p.ref_std is None or p.ref_std > 0, "method.ref_std", p.ref_std, "it must be > 0, or null")
    _check(p.num_value_layers_unfrozen == 0, "method.num_value_layers_unfrozen", p.num_value_layers_unfrozen,
           "a value branch with its own unfrozen layers is not supported: the value head sits on the shared "
           "trunk; set it to 0")
    _check_generation(p, seq_length)


def _check_generation(p: PPOConfig | GRPOConfig, seq_length: int) -> None:
    _check(p.max_turns >= 1, "method.max_turns", p.max_turns, "an episode has at least one assistant turn (1 = "
           "single-turn)")
    _check(p.max_tool_calling_iterations is None or p.max_tool_calling_iterations >= 0,
           "method.max_tool_calling_iterations", p.max_tool_calling_iterations, "give a count >= 0, or null for no limit")
    _check_gen_kwargs(p.gen_kwargs, "method.gen_kwargs", seq_length)
    if p.gen_experience_kwargs is not None:
        _check_gen_kwargs(p.gen_experience_kwargs, "method.gen_experience_kwargs", seq_length)
    for name, kwargs in p.eval_gen_kwargs.items():
        _check(isinstance(name, str) and name.isidentifier() and isinstance(kwargs, dict),
               f"method.eval_gen_kwargs.{name}", kwargs, "map names (like 'greedy') to dicts of generate arguments")
        _check_gen_kwargs({**p.gen_kwargs, **kwargs}, f"method.eval_gen_kwargs.{name}", seq_length)


def _validate_group_method(g: GRPOConfig, config: Config) -> None:
    from rlora.algo.group import ESTIMATORS, SCALE_REWARDS
    from rlora.algo.loss_types import LOSS_TYPES

    for key in ("ppo_epochs", "num_rollouts", "chunk_size", "num_generations"):
        _check(getattr(g, key) >= 1, f"method.{key}", getattr(g, key), "it must be at least 1")
    num_generations = g.num_generations
    _check(num_generations >= 2, "method.num_generations", num_generations,
           "a group needs at least 2 completions per prompt; set it to 2 or more (8 is usual)")
    _check(g.num_rollouts % num_generations == 0, "method.num_rollouts", g.num_rollouts,
           f"it must be a multiple of method.num_generations={num_generations} (whole groups per phase)")
    _check(g.chunk_size % num_generations == 0, "method.chunk_size", g.chunk_size,
           "it counts completions generated at once, in whole groups: use a multiple of "
           f"num_generations={num_generations}")
    for key, allowed in (("advantage_estimator", ESTIMATORS), ("scale_rewards", SCALE_REWARDS),
                         ("loss_type", LOSS_TYPES), ("importance_sampling_level", ("token", "sequence"))):
        _check(getattr(g, key) in allowed, f"method.{key}", getattr(g, key), f"use one of {', '.join(allowed)}")
    _check(g.epsilon > 0, "method.epsilon", g.epsilon, "it must be > 0 (0.2 is usual)")
    _check(g.epsilon_high is None or g.epsilon_high >= g.epsilon, "method.epsilon_high", g.epsilon_high,
           f"clip-higher must be >= method.epsilon={g.epsilon} (DAPO: 0.28), or null for epsilon")
    _check(g.loss_type != "cispo" or g.epsilon_high is not None, "method.epsilon_high", g.epsilon_high,
           "loss_type 'cispo' bounds the importance weight by epsilon_high itself (not 1 + epsilon_high); set it, "
           "e.g. 5.0 as ScaleRL does")
    _check(g.beta >= 0, "method.beta", g.beta, "it must be >= 0 (0 = no KL term and no reference pass)")
    _check(0.0 <= g.gamma <= 1.0, "method.gamma", g.gamma, "it must be in [0, 1]")
    _check(g.max_num_gen_batches >= 0, "method.max_num_gen_batches", g.max_num_gen_batches,
           "it must be >= 0 (0 = no cap on draws)")
    _check(g.overlong_penalty_factor >= 0, "method.overlong_penalty_factor", g.overlong_penalty_factor,
           "it must be >= 0")
    _check_generation(g, config.train.seq_length)
    kwargs = rollout_gen_kwargs(g)
    _check(kwargs.get("do_sample", False), "method.gen_kwargs.do_sample" if g.gen_experience_kwargs is None else
           "method.gen_experience_kwargs.do_sample", kwargs.get("do_sample"),
           "a group's completions must be sampled (greedy gives G equal ones); set do_sample: true")
    max_new = kwargs["max_new_tokens"]
    _check(g.overlong_buffer_len is None or 1 <= g.overlong_buffer_len <= max_new, "method.overlong_buffer_len",
           g.overlong_buffer_len, f"it must be in [1, max_new_tokens={max_new}], or null to turn shaping off")
    if g.shared_prefix:  # the passes take whole groups: batches are shuffled group by group
        for key in ("batch_size", "minibatch_size"):
            value = getattr(config.train, key) or config.train.batch_size
            _check(value % num_generations == 0, f"train.{key}", value,
                   "with method.shared_prefix each pass takes whole groups: make it a multiple of "
                   f"num_generations={num_generations}, or set method.shared_prefix: false")
    _check(config.model.value_adapter is None, "model.value_adapter", config.model.value_adapter,
           "the group methods have no critic; drop model.value_adapter (or use method.name: PPOConfig)")
    if g.importance_sampling_level == "sequence" and g.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        warnings.warn(  # as TRL 1.16 warns; GSPO's objective (Zheng et al. 2025, eq. 5) is a mean over sequences
            f"method.importance_sampling_level='sequence' (GSPO) with loss_type={g.loss_type!r} sums per-token "
            "losses, which weights each sequence by its length instead of optimizing GSPO's per-sequence "
            "objective; GSPO's paper averages over sequences, which is method.loss_type: grpo", UserWarning,
            stacklevel=2)


@functools.lru_cache(maxsize=1)
def _generation_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    keys = {k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"}
    return frozenset(keys | _GENERATE_ONLY_KWARGS)


def _check_gen_kwargs(kwargs: dict, key: str, seq_length: int) -> None:
    valid = _generation_keys()
    for name in kwargs:
        if name not in valid:
            raise unknown_key(f"{key}.{name}", valid)
    _check(kwargs.get("num_return_sequences", 1) == 1, f"{key}.num_return_sequences", kwargs.get("num_return_sequences"),
           "rlora samples one response per prompt; drop it and list a prompt several times for several samples")
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        _check(total not in kwargs, f"{key}.{total}", kwargs.get(total),
               f"it counts prompt + response tokens (transformers' meaning), which depends on how prompts are "
               f"batched; set {key}.{new} instead (rlora.trlx.train converts a trlx config's {total})")
    n = kwargs.get("max_new_tokens")
    _check(n is not None, f"{key}.max_new_tokens", n, f"set {key}.max_new_tokens (rlora sizes prompts from it)")
    _check(isinstance(n, int) and not isinstance(n, bool) and 1 <= n < seq_length, f"{key}.max_new_tokens", n,
           f"it must be an integer in [1, train.seq_length={seq_length}); lower it or raise train.seq_length")
