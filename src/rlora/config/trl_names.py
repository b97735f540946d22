"""TRL's `GRPOConfig` field names and what each is in rlora: one table, as data.

Users bring TRL 1.16 GRPO configs. Where a TRL name is not an rlora key, config loading
reports it (`trl_key_hint`) with rlora's equivalent or the reason rlora does not run it,
instead of a "did you mean" guess from the spelling (`num_iterations` is not
`num_generations`). The table also serves a TRL-compatible face (`rlora.trl`), so every
field TRL 1.16 declares on `GRPOConfig` is listed, plus the `TrainingArguments` fields GRPO
scripts set most.

`TRLField.rlora` is rlora's key for the same setting (dotted, from the config's top), or None
where rlora does not run it; `note` says how the value carries over, or why not.
"""

from __future__ import annotations

from typing import NamedTuple


class TRLField(NamedTuple):
    """What one TRL field is in rlora."""

    rlora: str | None
    """rlora's key for the setting ("method.ppo_epochs"); None where rlora does not run it."""
    note: str = ""
    """How the value carries over (when `rlora` is set), or why rlora does not run it."""


def _same(key: str) -> TRLField:
    return TRLField(key, "the same name and meaning")


_VLLM = TRLField(None, "rlora samples with transformers' generate on the policy itself, the adapter live or merged "
                       "(method.merge_adapter_for_generation); vLLM is not used")
_VLLM_IS = TRLField(None, "the importance-sampling correction for a vLLM sampler; rlora samples from the policy it "
                          "scores, so there is nothing to correct")
_SAPO = TRLField(None, "loss_type 'sapo' is not implemented; rlora's loss types are grpo, bnpo, dr_grpo, dapo and cispo")
_VESPO = TRLField(None, "loss_type 'vespo' is not implemented; rlora's loss types are grpo, bnpo, dr_grpo, dapo and cispo")
_REF_SYNC = TRLField(None, "the reference is the frozen base with the adapter disabled (or the starting adapter's "
                           "frozen copy, model.reference); TR-DPO's syncing of it into the policy is not implemented")
_ENTROPY = TRLField(None, "there is no entropy bonus or adaptive entropy control (the entropy is logged as "
                          "`entropy`)")
_COMPLETION_LOGS = TRLField(None, "rlora prints and logs a table of eval samples at every evaluation "
                                  "(train.eval_interval); it has no separate completion log")
_CONTINUOUS = TRLField(None, "rollouts are sampled with plain batched generate (method.chunk_size completions at "
                             "once); continuous batching is not used")

GRPO_FIELDS: dict[str, TRLField] = {
    # --- the model and reference model
    "learning_rate": TRLField("optimizer.kwargs.lr", "TRL's default is 1e-6"),
    "model_init_kwargs": TRLField("model.model_extra_configs", "extra from_pretrained arguments; the precision "
                                                               "is model.dtype, trust_remote_code "
                                                               "model.trust_remote_code"),
    "trust_remote_code": TRLField("model.trust_remote_code", "for the model and its tokenizer"),
    "router_aux_loss_coef": TRLField(None, "a mixture-of-experts router's auxiliary loss is not added"),
    "disable_dropout": TRLField(None, "always so in rlora: every RL pass runs with dropout off (lora_dropout acts in "
                                      "`rlora sft` and `rlora rm`)"),
    "cast_lm_head_to_fp32": TRLField(None, "the LM head runs in model.dtype; log-probs are always taken in float32 "
                                           "from its logits (model.dtype: float32 runs everything in float32)"),
    # --- data
    "remove_unused_columns": TRLField(None, "a prompt's other fields always reach the reward functions as keyword "
                                            "arguments (task.prompt_field names the prompt's)"),
    "num_generations": _same("method.num_generations"),
    "num_generations_eval": TRLField(None, "evaluation samples each eval prompt once per setting "
                                           "(method.eval_gen_kwargs); list a prompt several times for more"),
    "max_completion_length": TRLField("method.gen_kwargs.max_new_tokens", "prompts are cut to train.seq_length - "
                                                                          "max_new_tokens"),
    "ds3_gather_for_generation": TRLField(None, "DeepSpeed ZeRO-3 is not used"),
    "shuffle_dataset": TRLField(None, "always so in rlora: each pass over the prompts is a fresh permutation seeded "
                                      "by train.seed"),
    "pad_to_multiple_of": TRLField(None, "rlora pads each batch itself; padding to a multiple is not offered"),
    "generation_batch_size": TRLField("method.num_rollouts", "completions per generation phase; method.chunk_size "
                                                             "of them are generated at once"),
    "steps_per_generation": TRLField("method.num_rollouts", "TRL's generation batch is steps_per_generation "
                                                            "microbatches: set method.num_rollouts to "
                                                            "train.minibatch_size x steps_per_generation"),
    # --- generation
    "temperature": TRLField("method.gen_kwargs.temperature", "every pass scores with the sampling temperature"),
    "top_p": TRLField("method.gen_kwargs.top_p"),
    "top_k": TRLField("method.gen_kwargs.top_k", "0 = no top-k filter"),
    "min_p": TRLField("method.gen_kwargs.min_p"),
    "generation_kwargs": TRLField("method.gen_kwargs", "its keys go into method.gen_kwargs (generate's arguments)"),
    "chat_template_kwargs": TRLField("tokenizer.chat_template_kwargs", "variables of every chat-template rendering"),
    "repetition_penalty": TRLField("method.gen_kwargs.repetition_penalty"),
    "cache_implementation": TRLField("method.gen_kwargs.cache_implementation"),
    "use_vllm": _VLLM, "vllm_mode": _VLLM, "vllm_model_impl": _VLLM, "vllm_enable_sleep_mode": _VLLM,
    "vllm_structured_outputs_regex": _VLLM, "vllm_server_base_url": _VLLM, "vllm_server_host": _VLLM,
    "vllm_server_port": _VLLM, "vllm_server_timeout": _VLLM, "vllm_group_port": _VLLM,
    "vllm_gpu_memory_utilization": _VLLM, "vllm_max_model_length": _VLLM, "vllm_tensor_parallel_size": _VLLM,
    # --- training
    "beta": _same("method.beta"),
    "num_iterations": TRLField("method.ppo_epochs", "passes over each generation phase (TRL's mu)"),
    "epsilon": _same("method.epsilon"),
    "delta": TRLField(None, "two-sided clipping of the ratio (an upper bound for negative advantages) is not "
                            "implemented"),
    "epsilon_high": TRLField("method.epsilon_high", "the same name and meaning (for cispo, the bound on the weight)"),
    "sapo_temperature_neg": _SAPO, "sapo_temperature_pos": _SAPO,
    "vespo_k_pos": _VESPO, "vespo_lambda_pos": _VESPO, "vespo_k_neg": _VESPO, "vespo_lambda_neg": _VESPO,
    "importance_sampling_level": _same("method.importance_sampling_level"),
    "reward_weights": TRLField("task.reward_weights", "one weight per reward function"),
    "multi_objective_aggregation": TRLField(None, "rlora sums the weighted rewards, then scales (TRL's default "
                                                  "'sum_then_normalize'); 'normalize_then_sum' is not implemented"),
    "scale_rewards": TRLField("method.scale_rewards", "'group', 'batch' or 'none'; TRL's older true / false load "
                                                      "as 'group' / 'none'"),
    "loss_type": TRLField("method.loss_type", "grpo, bnpo, dr_grpo, dapo (the default, as TRL's) or cispo"),
    "mask_truncated_completions": _same("method.mask_truncated_completions"),
    "sync_ref_model": _REF_SYNC, "ref_model_mixup_alpha": _REF_SYNC, "ref_model_sync_steps": _REF_SYNC,
    "top_entropy_quantile": TRLField(None, "masking the loss to high-entropy tokens is not implemented"),
    "entropy_coef": _ENTROPY, "use_adaptive_entropy": _ENTROPY, "entropy_coef_min": _ENTROPY,
    "entropy_coef_max": _ENTROPY, "entropy_coef_delta": _ENTROPY, "entropy_target": _ENTROPY,
    "max_tool_calling_iterations": _same("method.max_tool_calling_iterations"),
    "vllm_importance_sampling_correction": _VLLM_IS, "vllm_importance_sampling_mode": _VLLM_IS,
    "vllm_importance_sampling_clip_max": _VLLM_IS, "vllm_importance_sampling_clip_min": _VLLM_IS,
    "vllm_importance_sampling_cap": _VLLM_IS,
    "off_policy_mask_threshold": TRLField(None, "off-policy sequence masking is not implemented"),
    "use_bias_correction_kl": TRLField("method.use_bias_correction_kl", "the same name and meaning; TRL's default "
                                                                        "true, rlora's false"),
    # --- logging
    "log_completions": _COMPLETION_LOGS, "log_multimodal": _COMPLETION_LOGS,
    "num_completions_to_print": _COMPLETION_LOGS, "log_unique_prompts": _COMPLETION_LOGS,
    "log_completions_hub_repo": _COMPLETION_LOGS,
    "use_transformers_continuous_batching": _CONTINUOUS, "transformers_continuous_batching_config": _CONTINUOUS,
    "use_transformers_paged": _CONTINUOUS,
    # --- transformers' TrainingArguments, as GRPO scripts set them
    "per_device_train_batch_size": TRLField("train.minibatch_size", "rlora's sizes are global: minibatch_size is "
                                                                    "one forward/backward over all processes"),
    "gradient_accumulation_steps": TRLField("train.batch_size", "train.batch_size (experiences per optimizer "
                                                                "step) = minibatch_size x accumulation steps"),
    "max_steps": TRLField("train.total_steps", "optimizer steps"),
    "num_train_epochs": TRLField("train.epochs", "passes over the prompts"),
    "seed": TRLField("train.seed"),
    "output_dir": TRLField("train.run_dir", "checkpoints go to train.checkpoint_dir"),
    "logging_steps": TRLField(None, "every optimizer step is logged"),
    "save_steps": TRLField("train.checkpoint_interval", "optimizer steps between checkpoints"),
    "eval_steps": TRLField("train.eval_interval", "optimizer steps between evaluations"),
    "bf16": TRLField("train.mixed_precision", "'bf16': bf16 autocast over float32 weights; model.dtype: "
                                              "bfloat16 loads the frozen base in bf16 instead (faster)"),
    "max_grad_norm": TRLField("train.max_grad_norm", "TRL clips at 1.0 by default; rlora only when set"),
    "lr_scheduler_type": TRLField("scheduler.kwargs.type", "with scheduler.name: transformers, any of transformers' "
                                                           "schedules over steps"),
    "weight_decay": TRLField("optimizer.kwargs.weight_decay"),
    "adam_beta1": TRLField("optimizer.kwargs.betas", "the pair [beta1, beta2]"),
    "adam_beta2": TRLField("optimizer.kwargs.betas", "the pair [beta1, beta2]"),
    "adam_epsilon": TRLField("optimizer.kwargs.eps"),
    "report_to": TRLField("train.tracker", "null, 'tensorboard' or 'wandb'"),
    "run_name": TRLField("train.run_name"),
    "resume_from_checkpoint": TRLField("train.resume_from_checkpoint", "a checkpoint directory or 'latest'"),
    "max_prompt_length": TRLField("train.seq_length", "TRL < 1.0; prompts are cut to train.seq_length - "
                                                      "max_new_tokens, so seq_length = max_prompt_length + "
                                                      "max_new_tokens"),
}

# TRL's older spellings of values rlora names otherwise (TRL maps them the same way).
LEGACY_VALUES: dict[str, dict] = {"scale_rewards": {True: "group", False: "none"}}


def trl_key_hint(full: str) -> str | None:
    """The error message for an unknown config key `full` (dotted) whose last part is a TRL
    `GRPOConfig` name, or None when it is not one (or is rlora's key already)."""
    key = full.rpartition(".")[2]
    entry = GRPO_FIELDS.get(key)
    if entry is None or entry.rlora == full:
        return None
    if entry.rlora is None:
        return f"'{full}' is TRL's GRPOConfig.{key}, which rlora does not run: {entry.note}; drop it"
    note = f" ({entry.note})" if entry.note else ""
    return f"'{full}' is TRL's GRPOConfig.{key}; rlora's equivalent is '{entry.rlora}'{note}"


def legacy_value(key: str, value):
    """`value` of `key` with TRL's older spelling replaced by rlora's (`scale_rewards: true` ->
    "group"); any other value is returned as it is."""
    mapping = LEGACY_VALUES.get(key)
    if mapping is not None and isinstance(value, bool):
        return mapping[value]
    return value


__all__ = ["TRLField", "GRPO_FIELDS", "LEGACY_VALUES", "trl_key_hint", "legacy_value"]
