"""How an optimizer step's gradients are accumulated over its microbatches, reduced across
processes, clipped and applied, chosen once per run (docs/design.md §12): torch's way (one
process, DDP or FSDP2, through accelerate) or DeepSpeed's engine (ZeRO, `rlora.zero`). The loop calls the same three functions of either.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from rlora import zero
from rlora.distributed import Processes
from rlora.models import sharding


class TorchGradients:
    """Gradients summed over the microbatches with the reduction held back until the last one
    (one all-reduce or reduce-scatter a step), clipped to `max_grad_norm` over every process
    (or shard), and applied unless the loss or the norm is not finite on some process."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, params, sharded: bool,
                 max_grad_norm: float | None, dist: Processes):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.params, self.sharded, self.max_grad_norm, self.dist = params, sharded, max_grad_norm, dist

    def microbatch(self, last: bool) -> AbstractContextManager:
        """The context a microbatch's forward and backward run in."""
        if last:
            return nullcontext()
        return sharding.no_sync(self.model) if self.sharded else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The gradient's norm (after the reduction: the same on every process), clipped when
        `max_grad_norm` is set, and the optimizer step if the loss and the norm are finite on every
        process (one host sync decides). Returns the norm and whether the step was applied."""
        params = [p for p in self.params() if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = sharding.whole(self.accelerator.clip_grad_norm_(params, self.max_grad_norm))  # over every shard
        elif self.sharded:
            norm = sharding.grad_norm(params)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])) if params \
                else torch.zeros(())
        finite = bool(self.dist.max((~torch.isfinite(loss + norm)).float().reshape(1)).item() == 0)  # all agree
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach().float(), finite


class ZeroGradients:
    """DeepSpeed's engine accumulates, reduces (stage 2: as backward goes, into each process's
    partition), clips to its `gradient_clipping` (set from `train.max_grad_norm`) and applies.
    It skips the update when the gradient's global norm is not finite; it does not see the loss,
    so a step whose loss is not finite but whose gradient is finite is applied."""

    def __init__(self, engine):
        self.engine = engine

    def microbatch(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        zero.backward(self.engine, loss, last)

    def step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return zero.step(self.engine)


def gradients_for(accelerator, model: torch.nn.Module, optimizer, params, sharded: bool,
                  max_grad_norm: float | None, dist: Processes) -> TorchGradients | ZeroGradients:
    """DeepSpeed's way when `model` is its engine, else torch's."""
    engine = zero.engine_of(model)
    if engine is not None:
        return ZeroGradients(engine)
    return TorchGradients(accelerator, model, optimizer, params, sharded, max_grad_norm, dist)
