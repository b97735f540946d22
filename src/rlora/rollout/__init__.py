"""Rollouts: prompts, generation, scoring and the experience store of a PPO phase."""
