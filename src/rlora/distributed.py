"""What PPO needs across processes, on top of `accelerate`: sharding, gathered scoring, and
global statistics. With one process every call is the identity.

Launch with `accelerate launch -m rlora train CONFIG.yaml` or `torchrun --nproc_per_node N -m
rlora train CONFIG.yaml`; on CPU the gloo backend is used.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from rlora import zero
from rlora.algo import masked_whiten
from rlora.rollout.rewards import RewardFunctions, ScoreBatch


def make_accelerator(cpu: bool = False, mixed_precision: str | None = None) -> Accelerator:
    """The run's `Accelerator`: on CUDA when there is one and `cpu` is not asked for, else on the
    CPU over gloo; `mixed_precision` as accelerate names it (None: accelerate's default). Under
    `accelerate launch` with a DeepSpeed config and no CUDA it is DeepSpeed's CPU build over gloo:
    accelerate turns DeepSpeed off for an Accelerator made with cpu=True, and picks no
    process-group backend for it on a CPU."""
    kwargs = {} if mixed_precision is None else {"mixed_precision": mixed_precision}
    on_cpu = cpu or not torch.cuda.is_available()
    if on_cpu and zero.requested():
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    return Accelerator(cpu=on_cpu, **kwargs)


# DDP wrappers the trainers made, whose reducers `leave_process_group` frees before the group ends
_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def track_wrapper(model: torch.nn.Module) -> None:
    """Have `leave_process_group` free `model`'s DDP reducer while the group still exists."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        _WRAPPERS.add(model)


def leave_process_group() -> None:
    """Leave the process group together; call it at the end of a multi-process script (`rlora
    train` does). A gloo group torn down at interpreter exit while another process still runs
    aborts that process ("terminate called without an active exception").

    The trainers' DDP reducers are freed first, so a wrapper is unusable afterwards. A reducer
    that outlived the group would hold its last reference, and freeing it (from C++, with the GIL
    held) would join gloo's worker thread while that thread waits for the GIL to free the tensors
    of its last collective: a deadlock that hung runs at exit now and then (pytorch#56297)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        for wrapper in list(_WRAPPERS):
            for name in ("logger", "reducer"):  # the logger holds the reducer too
                wrapper.__dict__.pop(name, None)
        _WRAPPERS.clear()
        torch.distributed.destroy_process_group()


def call_through(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` run as the forward of `wrapper` (DDP, FSDP, ... around `module`), so the wrapper's
    forward-time work happens: DDP arms its gradient all-reduce in forward, and a pass that called
    `module`'s parts directly would leave the gradients of each process unsynced.
    A module sharded with FSDP2 in place is its own wrapper: its root hooks gather the root's
    parameters (`rlora.models.sharding`). With no wrapper (`wrapper is module`), simply `fn()`."""
    from torch.distributed.fsdp import FSDPModule  # sharded in place with fully_shard (rlora.models.sharding)

    if wrapper is module and not isinstance(module, FSDPModule):
        return fn()
    saved = module.__dict__.get("forward")

    def restore() -> None:
        if "forward" in module.__dict__:
            del module.forward
        if saved is not None:
            module.forward = saved

    def redirected(*args, **kwargs):
        restore()  # `fn` may call `module` itself: that is its own forward again
        return fn()

    module.forward = redirected
    try:
        return wrapper()
    finally:
        restore()


class Processes:
    """This process's place in the run and the collectives PPO uses."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main = accelerator.is_main_process

    def share(self, total: int, what: str) -> int:
        """This process's part of a global count (`num_rollouts`, `batch_size`, ...)."""
        if total % self.world:
            raise ValueError(f"{what}={total} does not split over {self.world} processes; "
                             f"make it a multiple of {self.world}")
        return total // self.world

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in rank order, on every process."""
        return list(items) if self.world == 1 else gather_object(list(items))

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else self.accelerator.reduce(x.to(self.accelerator.device), "mean").cpu()

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.to(self.accelerator.device).clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return x.cpu()

    def all_values(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's `x` (same shape on each), concatenated along dim 0."""
        return x if self.world == 1 else self.accelerator.gather(x.to(self.accelerator.device)).cpu()

    def score(self, reward_fns: RewardFunctions, batch: ScoreBatch, tokenizer, on_all_ranks: bool,
              trainer_state=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward functions on this process's samples: called once on the main process with
        every process's samples (trlx's contract) and the scores sent back, or on each process
        when `on_all_ranks` (a reward model per device). `trainer_state` (a
        `transformers.TrainerState`) reaches TRL-style functions. Returns this process's (weighted
        reward, per-function values), as `RewardFunctions` does."""
        if self.world == 1 or on_all_ranks:
            return reward_fns(batch, tokenizer, trainer_state)
        parts = self.gather([batch])
        mine = None
        if self.is_main:
            total, values = reward_fns(ScoreBatch.concat(parts), tokenizer, trainer_state)
            sizes = [len(part) for part in parts]
            mine = list(zip(total.split(sizes), *[v.split(sizes) for v in values.values()]))
            mine = [(t, dict(zip(values, vs))) for t, *vs in mine]
        total, values = self.broadcast(mine)[self.rank]
        width = max(batch.lengths) if batch.lengths else 0
        return (total[:, :width] if total.dim() == 2 else total), values

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`masked_whiten` with the mean and variance of the real tokens of every process."""
        if self.world == 1:
            return masked_whiten(x, mask)
        real = x[mask].double()
        totals = self.all_values(torch.stack([real.sum(), (real ** 2).sum(),
                                              torch.tensor(float(real.numel()), dtype=torch.float64)])[None])
        total, squares, count = totals.sum(0)
        mean = total / count
        biased = squares / count - mean ** 2
        var = biased * count / (count - 1) if count > 1 else biased  # Bessel's correction where defined
        return masked_whiten(x, mask, moments=(mean, var))
