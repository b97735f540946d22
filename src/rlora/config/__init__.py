"""Configuration: plain typed dataclasses, YAML load/save, dotted overrides, validation.

Sections and defaults follow trlx 0.7 (`train`, `model`, `tokenizer`, `optimizer`, `scheduler`,
`method`), so a trlx PPO YAML loads unchanged. Unlike trlx, an unknown key is an error at every
depth (section, field, `gen_kwargs`, `peft_config`) and names the closest valid key, and
cross-field checks run in `validate` before any model is loaded.

- `sections`: the dataclasses, no behaviour;
- `parse`: YAML, dicts and dotted overrides in, plain data out (the one place that builds sections);
- `validation`: type and cross-field checks of a built config;
- `trl_names`: TRL's `GRPOConfig` names and what each is in rlora.
"""

from rlora.config.parse import config_to_dict, load_config, save_config
from rlora.config.sections import (
    Config,
    GRPOConfig,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SchedulerConfig,
    TaskConfig,
    TokenizerConfig,
    TrainConfig,
    rollout_gen_kwargs,
)
from rlora.config.validation import validate

__all__ = [
    "Config", "TrainConfig", "ModelConfig", "TokenizerConfig", "OptimizerConfig", "SchedulerConfig",
    "PPOConfig", "GRPOConfig", "TaskConfig", "rollout_gen_kwargs", "load_config", "validate", "config_to_dict",
    "save_config",
]
