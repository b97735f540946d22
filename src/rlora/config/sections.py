"""The config sections: plain typed dataclasses, one docstring per field (trlx 0.7's sections
and PPO defaults, plus rlora's `task`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    seq_length: int = 1024
    """Maximum tokens of prompt + response; prompts are cut to `seq_length - max_new_tokens`."""
    epochs: int | None = None
    """Rollout phases before training stops, trlx's meaning (each phase collects `method.num_rollouts`
    and trains `ppo_epochs` passes over them); None = no cap, `total_steps` alone decides. A cap that
    ends the run before `total_steps` is warned about before the run starts."""
    total_steps: int = 10000
    """Optimizer steps before training stops."""
    batch_size: int = 128
    """Experiences per optimizer step."""
    minibatch_size: int | None = None
    """Experiences per forward/backward microbatch (gradient accumulation); None = `batch_size`."""
    checkpoint_interval: int = 10000
    """Optimizer steps between checkpoints."""
    eval_interval: int = 100
    """Optimizer steps between evaluations."""
    eval_at_start: bool = True
    """rlora: evaluate once before the first update, as a baseline (TRL's `eval_on_start`)."""
    checkpoint_dir: str = "ckpts"
    """Directory for checkpoints, within `run_dir`."""
    checkpoint_prefix: str = "step_"
    """rlora: a step checkpoint's name is this and the step (TRL's layout: "checkpoint-")."""
    logging_dir: str | None = None
    """Directory for tracker logs (tensorboard); None = the tracker's default."""
    run_dir: str | None = None
    """Where metrics.jsonl and plots go; None = `runs/<timestamp>`."""
    tracker: str | None = None
    """Metrics tracker: None, "tensorboard" or "wandb"."""
    project_name: str = "rlora"
    """Tracker project name."""
    entity_name: str | None = None
    """Tracker entity (wandb team)."""
    group_name: str | None = None
    """Tracker run group."""
    tags: list[str] = field(default_factory=list)
    """Tracker run tags."""
    seed: int = 1000
    """Seed for torch, numpy and random."""
    save_best: bool = True
    """Also keep the checkpoint with the best mean eval reward under `checkpoint_dir/best`."""
    save_optimizer: bool = True
    """Store optimizer and scheduler state in checkpoints (needed to resume exactly)."""
    resume_from_checkpoint: str | None = None
    """Checkpoint directory to resume from, or "latest" (the newest complete one of `run_dir`)."""
    keep_checkpoints: int = 2
    """rlora: how many of the latest `step_N` checkpoints to keep (plus `best/` with `save_best`)."""
    mixed_precision: str | None = None
    """rlora: "bf16" runs every forward (generation, rollout pass, reference, update) under bf16
    autocast with fp32 weights, as accelerate's mixed precision does; "no" = fp32; None = what
    `accelerate launch` (or $ACCELERATE_MIXED_PRECISION) sets, else fp32. It recasts the fp32 weights
    at every op: with a LoRA adapter, prefer `model.dtype: bfloat16` (a bf16 frozen base), the
    faster of the two on GPUs and on CPUs with AMX-BF16 (BENCHMARKS.md, SmolLM2 GRPO step)."""
    max_grad_norm: float | None = None
    """rlora: clip the gradient to this total norm before each optimizer step (TRL's default is 1.0);
    None = no clipping (trlx). The norm is logged as `grad_norm` either way."""
    max_bad_steps: int = 3
    """rlora: a step whose loss or gradient is not finite is skipped; this many in a row abort the run."""
    reward_on_all_ranks: bool = False
    """rlora: call reward_fn on every process with its own samples (a reward model per device)
    instead of once on the main process with everyone's (trlx's way)."""
    rollout_logging_dir: str | None = None
    """Directory to dump every rollout batch to; None = no dumps."""
    num_threads: int | None = None
    """torch CPU threads; None = $RLORA_NUM_THREADS, else the cores divided among local processes."""
    float32_matmul_precision: str | None = None
    """rlora: `torch.set_float32_matmul_precision` for the process: "highest" (IEEE float32),
    "high" (TF32 on NVIDIA GPUs), "medium" (also bf16-rounded inputs with float32 accumulation,
    which oneDNN runs on CPUs with AMX-BF16); None = leave torch's setting. "medium" speeds up a
    lone large product but converts each fp32 weight at every use, so it can slow a training step
    (BENCHMARKS.md, SmolLM2 GRPO step); for speed on such CPUs prefer a bf16 frozen base
    (`model.dtype`)."""
    fsdp: bool = False
    """rlora: shard the base and its adapters over the processes with torch's FSDP2, one unit per
    decoder layer (`rlora.models.sharding`), instead of a whole base on each (DDP). Needs several
    processes (`torchrun`); under `accelerate launch` with an FSDP2 config it is implied."""
    pipeline: str = "PromptPipeline"
    """trlx compatibility: only "PromptPipeline"."""
    trainer: str = "AcceleratePPOTrainer"
    """trlx compatibility: "AcceleratePPOTrainer" or "PPOTrainer"; rlora has one trainer for every
    method, which `method.name` selects."""
    trainer_kwargs: dict = field(default_factory=dict)
    """trlx compatibility: extra trainer arguments; rlora's trainer takes none, so only {}."""
    run_name: str | None = None
    """Tracker run name (wandb's `name`); None = the tracker's own."""


@dataclass
class ModelConfig:
    model_path: str | Any = None
    """Local directory or hub name, or a `transformers.PretrainedConfig` (random init)."""
    model_arch_type: str = "causal"
    """Only "causal" is supported."""
    num_layers_unfrozen: int = -1
    """Without PEFT: -1 = all trainable, 0 = none, N > 0 = top N blocks (hydra reference)."""
    peft_config: dict | Any | None = None
    """A peft `PeftConfig` or a plain dict such as {"peft_type": "LORA", "r": 8}; None = no PEFT."""
    value_adapter: dict | Any | str | None = None
    """The critic's own adapter on the same base (adapter mode): a peft LoRA config (dict or
    object), or a reward-adapter directory (`rlora rm`) whose adapter it starts from. None = the
    value head reads the policy's trunk (trlx)."""
    reward_adapter: str | None = None
    """A directory written by `rlora rm` (LoRA adapter + score head, trained on this base): its
    score of each rollout is the reward, added to `reward_fn`'s when both are given."""
    reference: str = "base"
    """rlora: the KL reference. "base" = the frozen base, the adapters switched off; "adapter" = a
    frozen copy of the adapter the policy starts from (an SFT adapter given as `model_path`), on
    the same base, so the KL is measured from where training started (TRL's reference for a
    PeftModel)."""
    dtype: str = "float32"
    """rlora: the precision the base is loaded in: "float32", "bfloat16" or "auto" (the checkpoint's
    own); adapters and the value head stay float32."""
    quantization: str | None = None
    """rlora: the frozen base held quantized by bitsandbytes (QLoRA; `pip install rlora[quant]`):
    "nf4" or "fp4" (4-bit, double-quantized, computing in `dtype`; "auto" computes in float32) or
    "int8"; null = unquantized. Every role runs on it; adapters and heads stay float32. Needs a
    peft adapter; the merged sampler and `generation_dtype` are refused over it (merging into 4-bit
    weights rounds). Other bitsandbytes settings: `model_extra_configs.quantization_config`."""
    generation_dtype: str | None = None
    """rlora: the precision rollouts are sampled in; None = the model's own. "bfloat16" over a
    float32 model samples each chunk on a bf16 copy of the weights with the adapter merged in
    (faster decoding on CPUs with AVX-512 BF16 and on GPUs, for half the weights' memory more
    while sampling; BENCHMARKS.md); the scoring passes and the update stay in the model's precision, so the samples
    come from a distribution a bf16 rounding away from the one scored (as with a vLLM sampler).
    Evaluation samples in the model's precision."""
    attention_dtype: str | None = None
    """rlora: the precision attention is computed in for a bf16 model: None = float32 while on CPU
    (torch's CPU flash-attention backward is slow in bf16, see `rlora.models.attention`), the
    model's own on GPU; "float32" always; "model" = the model's own (and any attn_implementation in
    model_extra_configs). Every pass and role of the model runs the same attention, so the
    reference and the scoring passes match the update. Models whose code tests for the name
    "sdpa" (Falcon, Gemma 4) keep theirs."""
    adapter_compute_dtype: str = "model"
    """rlora: the precision a bf16 base's float32 adapters compute in. "model" (the default) runs
    every pass under bf16 autocast, so the adapters' products and the deltas they add run in bf16,
    as the base's own do, while their weights, gradients and optimizer state stay float32 (the
    mixed precision TRL's `bf16=True` gives; faster and smaller than "float32", BENCHMARKS.md);
    "float32" keeps peft's way, inputs upcast to float32 and the
    sum of base and delta rounded to bf16 once. No effect on a float32 base, nor when
    `train.mixed_precision` turns autocast on itself. The value head and the reward adapter's score
    head stay float32 either way."""
    fused_activations: bool = True
    """rlora: run a tanh GELU that transformers composes of Python ops (`gelu_new` / `gelu_fast`:
    GPT-2, GPT-J) as torch's one kernel of the same function (`gelu_pytorch_tanh`), equal to float
    rounding; faster, and it keeps only its input for backward. False runs the model's own."""
    gradient_checkpointing: bool = False
    """rlora: recompute each decoder layer's activations in the backward pass instead of keeping
    them (transformers' non-reentrant checkpointing), in every pass with gradients, the shared
    prefix's included: less memory for longer sequences, for about one more forward's time."""
    model_extra_configs: dict = field(default_factory=dict)
    """Extra keyword arguments for `from_pretrained`."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained` for the model and tokenizer."""


@dataclass
class TokenizerConfig:
    tokenizer_path: str | None = None
    """Local directory or hub name; None = `model.model_path`."""
    padding_side: str = "left"
    """"left" or "right"."""
    truncation_side: str = "right"
    """"left" or "right": the side a plain-text prompt over the limit is cut from (trlx's); a
    conversation keeps its end, its earliest messages dropped whole."""
    chat_template: str | None = None
    """rlora: a Jinja chat template for chat-message prompts, instead of the tokenizer's own; or
    "hermes", rlora's ChatML template that renders tools (`rlora.tools.HERMES_TOOL_TEMPLATE`)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables of the chat template in every rendering of a conversation (prompts,
    episodes, the prefix check), as TRL's `chat_template_kwargs`: e.g. `{"enable_thinking":
    false}` for a Qwen3 template. A template that does not read a variable ignores it."""
    add_special_tokens: bool = True
    """rlora: open each prompt with the tokenizer's own special tokens (a BOS for Llama / Mistral
    tokenizers; GPT-2's adds none), as `tokenizer(text)` does; false = no special tokens (trlx)."""
    tokenizer_extra_configs: dict = field(default_factory=dict)
    """Extra keyword arguments for `AutoTokenizer.from_pretrained`."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """One of "adamw", "adam", "sgd"."""
    kwargs: dict = field(default_factory=lambda: {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6})
    """Keyword arguments of the torch optimizer (replaced as a whole when given)."""


@dataclass
class SchedulerConfig:
    name: str = "cosine_annealing"
    """One of "cosine_annealing", "linear", "constant" (torch's, as trlx), or "transformers": the
    schedule `transformers.get_scheduler` builds over `train.total_steps`, with `kwargs` `type`
    (its SchedulerType: "linear", "cosine", "constant_with_warmup", ...), `num_warmup_steps` and
    its `scheduler_specific_kwargs`, as TRL's `lr_scheduler_type` and `warmup_steps`."""
    kwargs: dict = field(default_factory=lambda: {"T_max": 1e12, "eta_min": 3e-5})
    """Keyword arguments of the torch scheduler (trlx's default is effectively constant)."""


@dataclass
class PPOConfig:
    name: str = "PPOConfig"
    """trlx compatibility: the method name, only "PPOConfig"."""
    ppo_epochs: int = 4
    """Passes over each rollout store."""
    num_rollouts: int = 128
    """Experiences collected per PPO phase."""
    chunk_size: int = 128
    """Prompts each process generates for at once."""
    init_kl_coef: float = 0.001
    """Initial KL penalty coefficient beta."""
    target: float | None = None
    """Target KL for the adaptive controller; None = fixed coefficient."""
    horizon: int = 10000
    """Adaptive KL controller horizon."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value prediction clip."""
    vf_coef: float = 1.0
    """Value loss weight."""
    scale_reward: str | None = "ignored"
    """Score scaling: "ignored" (or None), "running" or "ref"."""
    ref_mean: float | None = None
    """Reference score mean for `scale_reward="ref"`; None = measured on the first rollouts."""
    ref_std: float | None = None
    """Reference score std for `scale_reward="ref"`; None = measured on the first rollouts."""
    cliprange_reward: float = 10.0
    """Scores are clipped to [-cliprange_reward, cliprange_reward]."""
    gen_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0,
                                                      "do_sample": True})
    """`generate` arguments for evaluation (and rollouts unless `gen_experience_kwargs` is set)."""
    gen_experience_kwargs: dict | None = None
    """`generate` arguments for rollouts; None = `gen_kwargs`."""
    eval_gen_kwargs: dict = field(default_factory=dict)
    """rlora: extra named eval settings, each over `gen_kwargs` (`{greedy: {do_sample: false}}`);
    logged as `reward/<name>/mean` and `metrics/<name>/<metric>`."""
    merge_adapter_for_generation: bool = False
    """rlora: generate rollouts with the adapter merged into the base (restored exactly after);
    pays off for small-batch decoding on GPUs, not measurably on CPU (see BENCHMARKS.md)."""
    num_value_layers_unfrozen: int = 0
    """trlx compatibility: blocks of a separate value branch; rlora's value head is on the trunk."""
    max_turns: int = 1
    """rlora: the most assistant turns of a multi-turn episode (an environment or tools given); an
    episode also ends when the environment has nothing more to say or `train.seq_length` is used up."""
    max_tool_calling_iterations: int | None = None
    """TRL's: the most turns of an episode whose tool calls are run; None = no limit but `max_turns`."""


@dataclass
class GRPOConfig:
    """The critic-free group methods (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO): several
    completions per prompt, advantages from the group's rewards, no value model. TRL's field names."""

    name: str = "GRPOConfig"
    """Selects the group methods (PPO: "PPOConfig")."""
    num_rollouts: int = 64
    """Completions per phase: `num_rollouts / num_generations` prompts, `num_generations` completions each."""
    num_generations: int = 8
    """G, completions per prompt (a group)."""
    chunk_size: int = 64
    """Completions each process generates at once, in whole groups (a multiple of `num_generations`)."""
    ppo_epochs: int = 1
    """Passes over each phase (TRL's `num_iterations`). With 1 and `train.batch_size >= num_rollouts`
    (one optimizer step a phase) the old log-probs are the current ones detached and no separate
    pass computes them."""
    advantage_estimator: str = "grpo"
    """"grpo", "rloo", "reinforce++" or "reinforce++_baseline"."""
    scale_rewards: str = "group"
    """grpo's advantage scale: "group" (the group's std), "batch" (the phase's std) or "none" (Dr.GRPO)."""
    loss_type: str = "dapo"
    """The loss (`rlora.algo.loss_types`): PPO's clipped surrogate per token, added up as "grpo"
    (per-sequence mean), "bnpo" (per microbatch token), "dr_grpo" (over batch × max_new_tokens) or
    "dapo" (over every real token of the optimizer step); or "cispo" (MiniMax-M1: the importance
    weight clipped at `epsilon_high` and detached, so no token loses its gradient; added up as dapo)."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 − epsilon."""
    epsilon_high: float | None = None
    """Upper clip 1 + epsilon_high (clip-higher; DAPO uses 0.28); None = `epsilon`. For
    loss_type "cispo", the bound on the importance weight itself (ScaleRL uses 5.0); required."""
    importance_sampling_level: str = "token"
    """"token" (per-token ratio) or "sequence" (GSPO's length-normalised sequence ratio)."""
    beta: float = 0.0
    """KL coefficient to the reference (the adapter disabled); 0 = no reference pass at all. In the
    loss as k3 for grpo; for reinforce++ as −beta·KL in the per-token reward."""
    use_bias_correction_kl: bool = False
    """TRL's: the k3 KL term weighted by the importance ratio (with its gradient), which keeps it
    unbiased for samples of an older policy; TRL's default is true, rlora's false (GRPO's plain k3)."""
    gamma: float = 1.0
    """reinforce++: discount of the per-token returns."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and draw more prompts until the phase is full."""
    max_num_gen_batches: int = 10
    """With `dynamic_sampling`: most chunks generated for one phase; when reached, the phase is
    filled up with groups of equal rewards (logged as `dynamic_sampling/filled`). 0 = no cap."""
    overlong_buffer_len: int | None = None
    """DAPO's overlong shaping: the last this-many tokens before `max_new_tokens` are penalised
    linearly down to `-overlong_penalty_factor`; None = off."""
    overlong_penalty_factor: float = 1.0
    """DAPO's overlong shaping: the penalty at `max_new_tokens`."""
    mask_truncated_completions: bool = False
    """Completions cut at `max_new_tokens` (no stop token) count in their group's statistics but not
    in the loss (DAPO)."""
    shared_prefix: bool = True
    """rlora: run each prompt once per group, its G completions on its KV cache: in generation (the
    same sampling) and in the update and rollout passes (the same log-probs and gradients up to
    float rounding; batches then hold whole groups). false = every row runs its own prompt."""
    gen_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0,
                                                      "do_sample": True})
    """`generate` arguments for evaluation (and rollouts unless `gen_experience_kwargs` is set)."""
    gen_experience_kwargs: dict | None = None
    """`generate` arguments for rollouts; None = `gen_kwargs`."""
    eval_gen_kwargs: dict = field(default_factory=dict)
    """Extra named eval settings, each over `gen_kwargs` (`{greedy: {do_sample: false}}`)."""
    merge_adapter_for_generation: bool = False
    """Generate rollouts with the adapter merged into the base (restored exactly after)."""
    max_turns: int = 1
    """rlora: the most assistant turns of a multi-turn episode (an environment or tools given); an
    episode also ends when the environment has nothing more to say or `train.seq_length` is used up."""
    max_tool_calling_iterations: int | None = None
    """TRL's: the most turns of an episode whose tool calls are run; None = no limit but `max_turns`."""


METHODS = {"ppoconfig": PPOConfig, "grpoconfig": GRPOConfig}  # method.name (any case) -> its section


def rollout_gen_kwargs(method: PPOConfig | GRPOConfig) -> dict:
    """The `generate` arguments rollouts are sampled with: `gen_experience_kwargs`, else `gen_kwargs`."""
    return method.gen_experience_kwargs or method.gen_kwargs


@dataclass
class TaskConfig:
    """rlora: what `rlora train` trains on; the Python API's arguments take precedence."""

    reward_fn: str | list[str] | None = None
    """The reward function, `package.module:function` or `path/to/file.py:function`, or a list of
    them (the reward is their weighted sum); rlora's or TRL's signature (see the README)."""
    reward_weights: list[float] | None = None
    """rlora: one weight per reward function; None = 1 each."""
    metric_fn: str | None = None
    """Optional eval metric function, named as `reward_fn`."""
    prompts: str | list | None = None
    """A list; a .txt (one prompt per line) or .jsonl file; `module:attribute` (a list or a function
    returning one); or `datasets:NAME[:SPLIT]` (a hub name or a save_to_disk directory)."""
    eval_prompts: str | list | None = None
    """Eval prompts, given as `prompts`; None = the first `train.batch_size` prompts."""
    prompt_field: str = "prompt"
    """The prompt's key in .jsonl rows and dataset records; the other keys become metadata."""
    stop_sequences: list[str] = field(default_factory=list)
    """Outputs are cut at the first of these strings and given an EOS."""
    environment: str | None = None
    """A multi-turn environment's factory (a class), `package.module:Class` or `path/to/file.py:Class`:
    one instance per episode (`rlora.environments`)."""
    tools: list[str] = field(default_factory=list)
    """Tools the model may call, each `module:function` (typed, with a Google-style docstring)."""


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop, logging and checkpointing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and adapter."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate scheduler."""
    method: PPOConfig | GRPOConfig = field(default_factory=PPOConfig)
    """The method and its hyperparameters: PPO, or a group method; chosen by `method.name`."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """rlora: reward function and prompts for the `rlora train` command."""


SECTIONS = (Config, TrainConfig, ModelConfig, TokenizerConfig, OptimizerConfig, SchedulerConfig, PPOConfig,
             GRPOConfig, TaskConfig)
