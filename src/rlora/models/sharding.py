"""Sharding the one base and its adapters over processes with torch's FSDP2 (`fully_shard`),
per decoder layer (docs/design.md §12).

Layout: each decoder block is one FSDP unit: its frozen base weights and every adapter's LoRA
weights inside it (the policy's, the critic's, the reward's; trainable or frozen) are sharded
together along dim 0, as FSDP2 shards each parameter on its own and reduce-scatters only the
gradients that exist. The root unit is the `Policy`: embeddings, final norm, language-model head,
value and score heads. Each process holds 1/N of every unit between passes.

FSDP2 gathers a unit in a forward pre-hook on its module. The blocks are always run through
their own modules, so every pass (generation, the rollout pass, the reference with adapters
switched off, the shared-prefix passes that call the trunk directly) gathers them. The root's
parameters are gathered by the root's own forward and, by FSDP2's rule for the root, kept gathered
until the next backward; a pass that does not start at the root's forward runs through it with
`rlora.distributed.call_through`, which every pass does (`run_through`).

Gathering for checkpoints uses `torch.distributed.checkpoint.state_dict` with full state dicts.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rlora.models.hydra import find_decoder_blocks


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded with FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_plugin(accelerator) -> Any:
    """accelerate's FSDP plugin of this run (`accelerate launch` with an FSDP config), or None."""
    return getattr(accelerator.state, "fsdp_plugin", None)


def shard_options(accelerator) -> dict[str, Any]:
    """`fully_shard` arguments: a one-dimensional mesh over every process on the accelerator's
    device type, and, under accelerate's FSDP2 plugin, its `reshard_after_forward`, mixed
    precision and CPU offload settings."""
    from torch.distributed.device_mesh import init_device_mesh

    options: dict[str, Any] = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,))}
    plugin = fsdp_plugin(accelerator)
    if plugin is not None:
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(f"accelerate's FSDP plugin is at fsdp_version={plugin.fsdp_version}; rlora shards with "
                             "FSDP2 (fully_shard) only: set fsdp_version: 2 in the accelerate config "
                             "(examples/accelerate/fsdp2.yaml)")
        if plugin.cpu_ram_efficient_loading:  # then transformers loads empty weights on all but process 0
            raise ValueError("accelerate's fsdp_cpu_ram_efficient_loading is on; rlora loads the whole base on "
                             "every process and shards it itself: set fsdp_cpu_ram_efficient_loading: false "
                             "(examples/accelerate/fsdp2.yaml)")
        if plugin.reshard_after_forward is not None:
            options["reshard_after_forward"] = plugin.reshard_after_forward
        if plugin.mixed_precision_policy is not None:
            options["mp_policy"] = plugin.mixed_precision_policy
        if plugin.cpu_offload:  # an OffloadPolicy under FSDP2
            options["offload_policy"] = plugin.cpu_offload
    return options


def shard_policy(policy: nn.Module, **options: Any) -> nn.Module:
    """Shard `policy` in place: each decoder block of its language model, then the policy as the
    root (`options` go to every `fully_shard` call). Returns it.

    Only adapter mode (LoRA and other peft tuners that live inside the layers) is laid out here:
    hydra's and full fine-tuning's frozen copies, and prompt tuning's encoder, are refused by
    config validation before a model loads.
    """
    from torch.distributed.fsdp import fully_shard

    _, _, blocks = find_decoder_blocks(policy.lm)
    for block in blocks:
        fully_shard(block, **options)
    # the root keeps FSDP2's own rule (gathered from its forward until the next backward), which the
    # passes that read its weights outside its forward rely on; it ignores reshard_after_forward
    fully_shard(policy, **{k: v for k, v in options.items() if k != "reshard_after_forward"})
    # each pass's outputs are read, never written in place, which is what this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPPolicy\) returned a view tensor")
    return policy


def check_shardable(config, policy: nn.Module, world: int) -> None:
    """Refuse a sharded run that cannot work, saying what to change (the config's own checks ran
    before the model loaded: `rlora.config.validation`)."""
    if world < 2:
        raise ValueError("train.fsdp=true shards the model over several processes, but this run has one; launch "
                         "with `torchrun --nproc_per_node N -m rlora train ...` (or `accelerate launch`), or set "
                         "train.fsdp: false")
    if policy.mode != "adapter":
        raise ValueError(f"train.fsdp shards a base with peft adapters inside its layers (LoRA and the like); this "
                         f"policy is in {policy.mode} mode (prompt tuning, hydra and full fine-tuning are not "
                         "sharded). "
                         "Set model.peft_config to a LoRA config, or train.fsdp: false")
    if config.method.merge_adapter_for_generation or config.model.generation_dtype is not None:
        from rlora.config.validation import validate

        validate(dataclasses.replace(config, train=dataclasses.replace(config.train, fsdp=True)))  # says which


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradients of sharded `model` kept whole and summed on each process inside this block, and
    reduce-scattered by the first backward after it (accelerate's `no_sync` under FSDP2)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def whole(x: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered to a plain one; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the gradients of `params` (sharded or not), the same on every process."""
    if not params:
        return torch.zeros(())
    return whole(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0))


def run_through(model: nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` as the forward of a sharded root `model`, so its pre-forward hook gathers the root's
    parameters (and, on the first pass, makes it FSDP2's root); with `model` not sharded, `fn()`."""
    from rlora.distributed import call_through

    return call_through(model, model, fn) if is_sharded(model) else fn()


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of sharded `model`, gathered whole, on the CPU of process 0 (an
    empty dict on the others); every process must call it. Keys are `model`'s parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole tensors `state` (keys: `model`'s parameter names, each process holding all of them)
    into sharded `model`, each process keeping its shard; parameters not in `state` stay."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    assert not result.unexpected_keys, result.unexpected_keys


def peft_saved_names(lm: nn.Module, adapter_name: str) -> dict[str, str]:
    """{name in peft's saved adapter file: parameter name in `lm`} for the adapter `adapter_name` of
    peft model `lm`, by peft's own save function (`get_peft_model_state_dict`) run over stand-in
    values: a sharded model's parameters cannot go through peft's `load_state_dict`."""
    from peft import get_peft_model_state_dict

    stand_ins = {name: torch.empty(0) for name, _ in lm.named_parameters()}
    owner = {id(value): name for name, value in stand_ins.items()}
    saved = get_peft_model_state_dict(lm, state_dict=stand_ins, adapter_name=adapter_name)
    return {key: owner[id(value)] for key, value in saved.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` of a sharded model's optimizer, gathered whole on process 0 and in
    the layout an unsharded optimizer saves (parameters numbered in `param_groups` order), so a
    checkpoint's optimizer.pt is the same whether the run was sharded; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    saved = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if not saved:  # processes other than 0
        return {}
    number = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {number[name]: value for name, value in saved["state"].items()},
            "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                             for group in saved["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an unsharded optimizer's `state_dict()` (every process holding it whole) into the
    optimizer of sharded `model`, each process keeping its shard of each state tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    state = {"state": {names[i]: value for i, value in saved["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in `param_groups` order."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]
