"""rlora: RL fine-tuning of language models with LoRA adapters on one frozen base: PPO and the
critic-free group methods (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO).

The policy is the base plus a trainable adapter, the reference model for the KL penalty is the
same module with the adapter disabled, and PPO's value head sits on the shared trunk (or on its
own critic adapter); a reward model can be one more adapter on the same base.
"""

from rlora.config import Config, load_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # import the heavy pieces (transformers, peft, accelerate) only when asked for
    if name in ("train", "evaluate", "build_trainer"):
        from rlora import api

        return getattr(api, name)
    if name in ("Trainer", "PPOTrainer"):
        from rlora import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rlora' has no attribute {name!r}")


__all__ = ["Config", "Trainer", "PPOTrainer", "build_trainer", "evaluate", "load_config", "train", "__version__"]
