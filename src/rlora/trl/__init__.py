"""TRL's GRPO and RLOO trainers on rlora: `from rlora.trl import GRPOConfig, GRPOTrainer` in place
of `from trl import ...`, and nothing else in a TRL 1.16 script changes (docs/design.md §10).
README's "Coming from TRL" says what carries over, what is refused and why."""

from rlora.trl.config import GRPOConfig, RLOOConfig
from rlora.trl.trainer import GRPOTrainer, RLOOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "RLOOConfig", "RLOOTrainer"]
