"""trlx's `trlx.data.default_configs`: the config classes and `default_ppo_config()` with
trlx 0.7's values. ILQL, SFT and NeMo are not implemented by rlora: their classes and default
configs import, and say what to use instead when used (`rlora.trlx.unsupported`)."""

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
from rlora.trlx.models.modeling_ilql import ILQLConfig
from rlora.trlx.trainer.accelerate_sft_trainer import SFTConfig
from rlora.trlx.unsupported import ILQL, NEMO, SFT, refused_function


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
    raise NotImplementedError(f"default_ilql_config(): {ILQL}")


def default_sft_config() -> TRLConfig:
    """Not available through trlx's API: supervised fine-tuning is `rlora sft`."""
    raise NotImplementedError(f"default_sft_config(): {SFT}")


# trlx's NeMo-Megatron defaults: importable, refused when called
default_nemo_20b_config = refused_function("default_nemo_20b_config", NEMO, __name__)
default_nemo_2b_config = refused_function("default_nemo_2b_config", NEMO, __name__)
default_nemo_1_3b_config = refused_function("default_nemo_1_3b_config", NEMO, __name__)


__all__ = ["TRLConfig", "TrainConfig", "ModelConfig", "TokenizerConfig", "OptimizerConfig", "SchedulerConfig",
           "PPOConfig", "ILQLConfig", "SFTConfig", "default_ppo_config", "default_ilql_config", "default_sft_config",
           "default_nemo_20b_config", "default_nemo_2b_config", "default_nemo_1_3b_config"]
