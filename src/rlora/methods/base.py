"""The seam between the loop and a method family (docs/design.md §6).

`rlora.trainer` runs one loop for every method; what differs lives in one object built from the
config's method section (`build_method`). The loop calls the same functions of it in the same
order for PPO and for the group methods, and holds no branch on which method runs:

1. `rollouts` — how a phase's rollouts are drawn: whole groups, and which to keep (a
   `rlora.methods.draws` policy: every draw, or DAPO's dynamic sampling);
2. `shape_chunk` — a chunk's rewards as the method needs them (checks, DAPO's overlong shaping);
3. `shape_phase` — the phase's rewards (PPO's running moments, scaling and clipping);
4. `passes`, `loss_mask`, `forward` — which no-grad passes the rollout pass runs, which tokens
   the loss counts, and the pass over a microbatch (the shared-prefix pass for groups);
5. `advantages` — advantages (and returns) from the rewards and the rollout pass;
6. `order` — how a phase's samples are shuffled into batches;
7. `step_shares`, `loss` — each microbatch's weight in the optimizer step, and its loss;
8. `phase_stats`, `end_phase` — what is logged of a phase, and what happens after it (PPO's KL
   controller).

Notation: `n` samples of a phase on this process, `b` microbatch, `r` response length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlora.algo import make_kl_controller
from rlora.distributed import Processes
from rlora.rollout.generation import Rollouts
from rlora.rollout.forward import ResponseOutputs
from rlora.rollout.store import Experience, Scored
from rlora.state import RunState


@dataclass(frozen=True)
class Passes:
    """Which no-grad passes a phase's rollout pass runs, as the method needs them."""

    old_logprobs: bool  # the policy's log-probs at rollout time, and its values where it has a value head
    reference: bool  # the reference's log-probs, for a KL term


@dataclass(frozen=True)
class Layout:
    """This process's share of the global sizes: rollouts a phase, samples a step and a microbatch."""

    rollouts: int
    batch_size: int
    minibatch_size: int


class Method:
    """What one method family does at each seam of the loop; one subclass per family (`PPO`,
    `GroupMethod`). Built once from the config; holds settings, never run state (that is
    `rlora.state.RunState`, passed in where a seam reads or updates it)."""

    num_generations: int = 1  # completions per prompt, generated and scored together on one process
    value_head: bool  # whether the policy has a value head (a critic)
    with_entropy: bool  # whether the update's pass computes the token entropy (logged)
    progress_key: str  # the phase statistic the progress bar shows
    passes: Passes

    def __init__(self, config: Any, batch_size: int):
        self.config = config

    def layout(self, dist: Processes, train: Any) -> Layout:
        """This process's rollouts, batch and microbatch sizes; raises where the method cannot run them."""
        raise NotImplementedError

    def check_policy(self, policy) -> None:
        """Raise, naming the fix, where the policy's roles do not fit the method (a value head)."""
        if self.value_head != (policy.value_head is not None):
            need = "needs a value head; build the policy with build_policy(config.model, tokenizer)" \
                if self.value_head else ("has no critic, but this policy has a value head; build it with "
                                         "rlora.models.build_policy(config.model, tokenizer, value_head=False)")
            raise ValueError(f"{type(self).__name__} {need}")

    @property
    def shares_prompts(self) -> bool:
        """Whether a group's prompt runs once, its KV cache serving the group, in generation."""
        return False

    def run_state(self, loader, shuffle: torch.Generator, run_dir: str) -> RunState:
        """A fresh run's state: the method's KL coefficient (fixed unless a controller adapts it)."""
        return RunState(loader, shuffle, kl_ctl=make_kl_controller(self.config.beta, None, 1), run_dir=run_dir)

    def rollouts(self, layout: Layout, dist: Processes, pad_id: int):
        """The draw policy of one phase (`rlora.methods.draws`), its chunks padded with `pad_id`."""
        raise NotImplementedError

    def shape_chunk(self, scored: Scored) -> Scored:
        """A chunk's rewards as the method trains on them."""
        return scored

    def shape_phase(self, scores: torch.Tensor, score_sums: torch.Tensor, state) -> torch.Tensor:
        """The phase's rewards, given every process's per-sample sums `score_sums` (N,)."""
        return scores

    def loss_mask(self, rollouts: Rollouts) -> torch.Tensor:
        """The tokens the loss counts: the model's own (never an environment's). Shape: -> (n, r) bool."""
        return rollouts.action_mask.clone()

    def forward(self, model, policy, mb: Experience, temperature: float, **flags) -> ResponseOutputs:
        """The pass over a microbatch's responses, through `model` (the prepared one in the update)."""
        raise NotImplementedError

    def advantages(self, exp: Experience, scores: torch.Tensor, score_sums: torch.Tensor, state,
                   dist: Processes) -> dict[str, Any]:
        """Fill `exp.advantages` (and `exp.returns`); return the phase statistics this computes."""
        raise NotImplementedError

    def order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A random order of the phase's `n` samples. Shape: -> (n,)."""
        return torch.randperm(n, generator=generator)

    def step_shares(self, exp: Experience, batch: torch.Tensor, micro: list[torch.Tensor],
                    dist: Processes) -> tuple[list[float], torch.Tensor, float | None]:
        """Each microbatch's weight in the optimizer step (so that the split never changes the
        step's gradient), the loss tokens of each (which weigh its statistics), and the step's
        loss tokens on every process where the loss divides by them (else None)."""
        raise NotImplementedError

    def loss(self, out: ResponseOutputs, mb: Experience, step_tokens: float | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one microbatch and its detached statistics."""
        raise NotImplementedError

    def phase_stats(self, phase: Scored, dist: Processes) -> dict[str, Any]:
        """What is logged of a phase's rollouts, over every process."""
        raise NotImplementedError

    def end_phase(self, stats: dict[str, float], state) -> None:
        """After a phase's last optimizer step."""


def loss_tokens(exp: Experience, micro: list[torch.Tensor]) -> torch.Tensor:
    """The tokens each microbatch's loss counts. Shape: -> (len(micro),) float64."""
    return torch.stack([exp.loss_mask[index].sum() for index in micro]).double()


def shares_of(counts: torch.Tensor) -> list[float]:
    """`counts` as fractions of their sum (equal shares when they sum to 0)."""
    return (counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(counts))).tolist()
