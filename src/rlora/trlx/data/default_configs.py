"""trlx's `trlx.data.default_configs`: the config classes and `default_ppo_config()` with
trlx 0.7's values. ILQL and SFT are not implemented by rlora; their default configs say what to
use instead."""

from __future__ import annotations

from rlora.trlx.data.configs import (
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainConfig,
    TRLConfig,
)


def default_ppo_config() -> TRLConfig:
    """trlx's PPO defaults: GPT-2 fine-tuned on IMDB (`lvwerra/gpt2-imdb`, a hub name: set
    `model.model_path` and `tokenizer.tokenizer_path` to local directories without network)."""
    return TRLConfig(
        train=TrainConfig(seq_length=1024, epochs=100, total_steps=10000, batch_size=32, checkpoint_interval=10000,
                          eval_interval=100, pipeline="PromptPipeline", trainer="AcceleratePPOTrainer"),
        model=ModelConfig(model_path="lvwerra/gpt2-imdb", num_layers_unfrozen=2),
        tokenizer=TokenizerConfig(tokenizer_path="gpt2", truncation_side="right"),
        optimizer=OptimizerConfig(name="adamw", kwargs=dict(lr=3e-5, betas=[0.9, 0.95], eps=1.0e-8,
                                                            weight_decay=1.0e-6)),
        scheduler=SchedulerConfig(name="cosine_annealing", kwargs=dict(T_max=1e12, eta_min=3e-5)),
        method=PPOConfig(name="PPOConfig", num_rollouts=128, chunk_size=128, ppo_epochs=4, init_kl_coef=0.001,
                         target=None, horizon=10000, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
                         vf_coef=1.0, scale_reward="ignored", ref_mean=None, ref_std=None, cliprange_reward=10.0,
                         gen_kwargs=dict(max_new_tokens=40, top_k=0, top_p=1.0, do_sample=True)),
    )


def default_ilql_config() -> TRLConfig:
    """Not available: ILQL (offline RL from scored samples) is not implemented by rlora."""
    raise NotImplementedError(
        "default_ilql_config(): rlora implements online PPO only, not trlx's ILQL. Score samples online with a "
        "reward_fn and use default_ppo_config(), or train a reward adapter from preference pairs with `rlora rm`")


def default_sft_config() -> TRLConfig:
    """Not available through trlx's API: supervised fine-tuning is `rlora sft`."""
    raise NotImplementedError(
        "default_sft_config(): rlora's supervised fine-tuning is not a trlx.train trainer; run "
        "`rlora sft --model DIR --data texts.jsonl --out DIR` (rlora.sft.sft from Python), then PPO from its output")


__all__ = ["TRLConfig", "TrainConfig", "ModelConfig", "TokenizerConfig", "OptimizerConfig", "SchedulerConfig",
           "PPOConfig", "default_ppo_config", "default_ilql_config", "default_sft_config"]
