"""trlx's `trlx.models.modeling_ppo`: its `PPOConfig` (trlx's t5 and summarize examples import it
from here) is rlora's. trlx's model classes (value-head and hydra wrappers) are not mirrored:
rlora builds every role from `model.model_path` itself."""

from rlora.config.sections import PPOConfig

__all__ = ["PPOConfig"]
