"""TRL 1.16's `GRPOConfig` and `RLOOConfig` on rlora: the same fields, names, defaults and batch
arithmetic, as `transformers.TrainingArguments` subclasses, so a TRL script's arguments are taken
as they are (docs/design.md §10).

Every field TRL declares is here, so that a script sets what it sets; what rlora does with each
is `rlora.trl.translate`'s: the fields rlora runs become its config, and a field set to anything
but its default that rlora does not run is refused with the reason (`rlora.config.trl_names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import TrainingArguments


@dataclass
class GRPOConfig(TrainingArguments):
    """TRL 1.16's GRPO arguments. The defaults TRL changes from `TrainingArguments` are its own:
    `learning_rate` 1e-6, `logging_steps` 10, `gradient_checkpointing` True and `bf16` True
    unless `fp16` is set."""

    # dict fields that TrainingArguments' __post_init__ also takes as a JSON object's text
    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["chat_template_kwargs"]

    # TrainingArguments defaults that TRL changes
    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    remove_unused_columns: bool | None = False
    # the model
    model_init_kwargs: dict | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = False
    cast_lm_head_to_fp32: bool = False
    # the data
    num_generations: int | None = 8
    num_generations_eval: int | None = None
    max_completion_length: int | None = 512
    max_prompt_length: int | None = None  # TRL before 1.0: prompts are cut (from the left) to this many tokens
    ds3_gather_for_generation: bool = True
    shuffle_dataset: bool | None = True
    pad_to_multiple_of: int | str | None = "auto"
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    # generation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_model_impl: str = "vllm"
    vllm_enable_sleep_mode: bool = False
    vllm_structured_outputs_regex: str | None = None
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    # training
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    delta: float | None = None
    epsilon_high: float | None = None
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    importance_sampling_level: str = "token"
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    scale_rewards: str | bool = "group"
    loss_type: str = "dapo"
    mask_truncated_completions: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    max_tool_calling_iterations: int | None = None
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    # logging
    log_completions: bool = False
    log_multimodal: bool = True
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False
    log_completions_hub_repo: str | None = None
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False
    vllm_importance_sampling_cap: float | None = None

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        self.generation_batch_size, self.steps_per_generation = generation_batch(
            self.per_device_train_batch_size, self.world_size, self.gradient_accumulation_steps,
            self.generation_batch_size, self.steps_per_generation)
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: a group needs at least 2 completions per prompt "
                             "to compare them")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                             f"num_generations ({self.num_generations}): a generation holds whole groups")


@dataclass
class RLOOConfig(GRPOConfig):
    """TRL 1.16's RLOO arguments: GRPO's, with the leave-one-out baseline and RLOO's defaults
    (`num_generations` 2, `beta` 0.05, `normalize_advantages` False)."""

    num_generations: int | None = 2
    beta: float = 0.05
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None


# GRPOConfig's fields that TRL 1.16's RLOOConfig does not have: RLOOConfig refuses them, as TRL's does
GRPO_ONLY = frozenset({
    "cast_lm_head_to_fp32", "delta", "entropy_coef", "entropy_coef_delta", "entropy_coef_max", "entropy_coef_min",
    "entropy_target", "importance_sampling_level", "log_completions_hub_repo", "loss_type",
    "max_tool_calling_iterations", "multi_objective_aggregation", "off_policy_mask_threshold",
    "sapo_temperature_neg", "sapo_temperature_pos", "scale_rewards", "top_entropy_quantile", "use_adaptive_entropy",
    "use_bias_correction_kl", "vespo_k_neg", "vespo_k_pos", "vespo_lambda_neg", "vespo_lambda_pos",
    "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode"})


def _suggesting(cls: type, not_taken: frozenset = frozenset()) -> type:
    """`cls` whose constructor names an unknown argument with the closest field, as rlora's config
    loading does (a dataclass's own TypeError names none); `not_taken` are fields it refuses."""
    import dataclasses
    import difflib

    init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls) if f.init} - not_taken

    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - names)
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "it is not one of TRL's GRPOConfig or TrainingArguments fields"
            raise TypeError(f"{cls.__name__} got an unknown argument {unknown[0]!r}; {hint}")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


GRPOConfig = _suggesting(GRPOConfig)
RLOOConfig = _suggesting(RLOOConfig, GRPO_ONLY)


def generation_batch(per_device: int, world: int, accumulation: int, generation_batch_size: int | None,
                     steps_per_generation: int | None) -> tuple[int, int]:
    """TRL's batch arithmetic: completions a generation holds and microbatch steps it lasts. With
    neither given, a generation lasts one optimizer step (`gradient_accumulation_steps`)."""
    global_batch = per_device * world
    if generation_batch_size is not None and steps_per_generation is not None:
        raise ValueError("'generation_batch_size' and 'steps_per_generation' can not be both configured at the same "
                         "time; give one")
    if generation_batch_size is None:
        steps = steps_per_generation if steps_per_generation is not None else accumulation
        return global_batch * steps, steps
    if generation_batch_size % global_batch:
        raise ValueError(f"generation_batch_size ({generation_batch_size}) must be divisible by the global batch size "
                         f"({global_batch} = per_device_train_batch_size x processes)")
    return generation_batch_size, generation_batch_size // global_batch


def defaults_of(args: Any) -> Any:
    """An instance of `args`' class with every default, beside the same output directory and
    device choice, to tell which fields a script set."""
    return type(args)(output_dir=args.output_dir, use_cpu=args.use_cpu, bf16=args.bf16, fp16=args.fp16)
