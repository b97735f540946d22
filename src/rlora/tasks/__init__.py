"""Built-in tasks: data, prompts, metric and reward of small benchmark problems."""

from rlora.tasks.randomwalks import RandomWalksTask, make_task

__all__ = ["RandomWalksTask", "make_task"]
