"""How a phase's rollouts are drawn: chunk by chunk until this process has its share, keeping
every completion (`EveryDraw`) or, DAPO's dynamic sampling, only groups whose rewards differ
(`DynamicSampling`). The loop asks a draw policy for the next chunk's size, hands it each scored
chunk, and takes the phase from it; it holds no sampling rule of its own.

Sizes count groups of `num_generations` completions (a group is one prompt's; PPO's groups have
one completion).
"""

from __future__ import annotations

import math

import torch

from rlora.distributed import Processes
from rlora.rollout.store import Scored


def equal_rewards(grouped: torch.Tensor) -> torch.Tensor:
    """Whether each group's rewards are all equal, exactly (a group of one judged reward, or none,
    counts as equal: it carries no advantage). NaN rewards (no function judged them) are left out.
    Shape: (groups, G) -> (groups,) bool."""
    judged = ~torch.isnan(grouped)
    high = torch.where(judged, grouped, -math.inf).amax(1)
    low = torch.where(judged, grouped, math.inf).amin(1)
    return (high == low) | (judged.sum(1) <= 1)


class EveryDraw:
    """Every completion drawn is kept: chunks of at most `per_chunk` groups until `need` groups."""

    def __init__(self, need: int, per_chunk: int, num_generations: int, pad_id: int):
        self.need, self.per_chunk, self.num_generations, self.pad_id = need, per_chunk, num_generations, pad_id
        self.kept: list[Scored] = []

    def short(self) -> int:
        """Groups still missing on this process."""
        return self.need - sum(len(c) for c in self.kept) // self.num_generations

    def next_size(self) -> int:
        """Groups to draw next on this process; 0 when the phase is full."""
        return max(0, min(self.per_chunk, self.short()))

    def add(self, chunk: Scored) -> None:
        self.kept.append(chunk)

    def phase(self) -> Scored:
        return Scored.concat(self.kept, self.pad_id)

    def stats(self, dist: Processes) -> dict[str, torch.Tensor]:
        return {}


class DynamicSampling(EveryDraw):
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2): a group whose rewards are all equal carries
    no advantage, so it is dropped and more prompts are drawn until the phase is full.

    Every process draws as many chunks as the process that needs most (the prompt order and the
    collectives stay in step). Groups drawn beyond the phase's need are discarded, as DAPO's own
    implementation does: sampled by this phase's policy, they would be off-policy in the next.
    After `max_draws` chunks (0: no cap) the phase is filled up with dropped groups.
    """

    def __init__(self, need: int, per_chunk: int, num_generations: int, pad_id: int, max_draws: int,
                 dist: Processes):
        super().__init__(need, per_chunk, num_generations, pad_id)
        self.max_draws, self.dist = max_draws, dist
        self.aside: list[Scored] = []  # dropped groups, to fill up with after the cap
        self.draws = self.groups = self.equal_groups = self.filled = self.discarded = 0

    def next_size(self) -> int:
        short = int(self.dist.max(torch.tensor([self.short()])).item())  # the same on every process
        if short <= 0 or self.max_draws and self.draws >= self.max_draws:
            return 0
        return self.per_chunk

    def add(self, chunk: Scored) -> None:
        equal = equal_rewards(chunk.scores.reshape(-1, self.num_generations))  # (groups,)
        rows = torch.arange(len(chunk)).reshape(-1, self.num_generations)
        self.draws, self.groups, self.equal_groups = self.draws + 1, self.groups + len(equal), \
            self.equal_groups + int(equal.sum())
        self.aside.append(chunk.select(rows[equal].reshape(-1).tolist()))
        self.kept.append(chunk.select(rows[~equal].reshape(-1).tolist()))

    def phase(self) -> Scored:
        short = self.short()
        if short > 0:  # the cap was reached
            self.filled = short
            self.kept.append(Scored.concat(self.aside, self.pad_id).select(
                list(range(short * self.num_generations))))
        phase = super().phase()
        rows = self.need * self.num_generations
        self.discarded = (len(phase) - rows) // self.num_generations
        return phase.select(list(range(rows))) if self.discarded > 0 else phase

    def stats(self, dist: Processes) -> dict[str, torch.Tensor]:
        counts = dist.all_values(torch.tensor([[self.draws, self.groups, self.equal_groups, self.filled,
                                                max(self.discarded, 0)]], dtype=torch.float64))
        return {"frac_reward_zero_std": counts[:, 2].sum() / counts[:, 1].sum(),  # over every group drawn
                "dynamic_sampling/draws": counts[:, 0].mean(), "dynamic_sampling/dropped_groups": counts[:, 2].sum(),
                "dynamic_sampling/filled": counts[:, 3].sum(),
                "dynamic_sampling/discarded_groups": counts[:, 4].sum()}
