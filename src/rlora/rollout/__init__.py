"""Rollouts: prompts, generation, the pass over sampled responses (`forward`), the user's reward
functions and their scores (`rewards`), and the experience store of a phase."""
