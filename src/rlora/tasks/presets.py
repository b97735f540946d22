"""The method presets of the built-in demos (`rlora demo --method ppo|grpo`): what every task's
GRPO run shares, and how many optimizer steps a phase takes."""

from __future__ import annotations

from typing import Any

METHODS = ("ppo", "grpo")  # `rlora demo --method`, for every task

# The group method every demo runs with `--method grpo`: 8 completions per prompt, one on-policy
# step a phase (the demos set batch_size to the phase's completions), DAPO's loss, no KL, no critic.
GRPO_METHOD = {"name": "GRPOConfig", "num_generations": 8, "ppo_epochs": 1, "loss_type": "dapo",
               "scale_rewards": "group", "beta": 0.0, "epsilon": 0.2, "shared_prefix": True}


def unknown_method(method: str) -> ValueError:
    return ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def phase_steps(settings: dict[str, Any], rollouts: int) -> int:
    """Optimizer steps a phase of `rollouts` completions takes with a task's `method_settings`."""
    return settings["method"]["ppo_epochs"] * (rollouts // settings["batch_size"])
