"""The run's state as data: what a checkpoint saves and a resumed run starts from, and what
evaluation reads (docs/design.md §6).

The loop (`rlora.trainer`) advances it; the method object (`rlora.methods`) reads and updates its
KL controller and reward moments; `rlora.checkpoint` writes and restores it; nothing else reaches
into the trainer for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlora.algo import RunningMoments
from rlora.rollout.prompts import PromptLoader
from rlora.rollout.store import Experience


@dataclass
class PhaseState:
    """A rollout phase between its rollout pass and its last optimizer step (checkpointed)."""

    exp: Experience
    batches: list[torch.Tensor]  # sample indices of each optimizer step, all epochs in order
    cursor: int  # optimizer steps of this phase already taken
    stats: dict[str, float]  # the phase's rollout statistics (logged with its first step)


@dataclass
class RunState:
    """Everything of a run that changes as it trains, beside the weights and the optimizer.

    The process-wide random states (torch, python, numpy) are the rest of it; checkpoints save
    them per process.
    """

    loader: PromptLoader  # the prompt order and the position in it (the same on every process)
    shuffle: torch.Generator  # orders each phase's samples into batches (the same on every process)
    kl_ctl: Any  # the KL coefficient: PPO's fixed or adaptive controller; a group method's beta, fixed
    running: RunningMoments = field(default_factory=RunningMoments)  # PPO's reward moments (scale_reward)
    ref_mean: float | None = None  # PPO's reference reward statistics (scale_reward: ref)
    ref_std: float | None = None
    step: int = 0  # optimizer steps taken
    phase: int = 0  # rollout phases completed
    pending: PhaseState | None = None  # the phase whose optimizer steps are under way
    bad_steps: int = 0  # non-finite steps skipped in a row
    best_reward: float = -math.inf  # the best mean eval reward so far (train.save_best)
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged record
    run_dir: str = ""  # where metrics, plots and checkpoints go
