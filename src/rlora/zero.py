"""DeepSpeed ZeRO (stages 1, 2 and 3) through accelerate (docs/design.md §12):
`accelerate launch --config_file examples/accelerate/zero2.yaml -m rlora train CONFIG.yaml`.

accelerate builds DeepSpeed's engine in `Accelerator.prepare`; this module does the rest the one
loop needs:

- the engine's batch fields come from rlora's layout (`train.batch_size`, `train.minibatch_size`)
  and its gradient clipping from `train.max_grad_norm`, so the config says them once;
- each optimizer step's last microbatch is the engine's accumulation boundary (the loop's step
  may have an unequal last microbatch, so no fixed count is assumed), and the microbatch losses
  keep rlora's weights (`scale_wrt_gas=False`);
- checkpoints hold the optimizer state (and, under stage 3, the weights) whole, in the layout a
  run without DeepSpeed saves, by DeepSpeed's own API (`deepspeed.utils.safe_get_full_optimizer_state`,
  `deepspeed.zero.GatheredParameters`): a checkpoint resumes under ZeRO, DDP or FSDP2 alike.
  Loading weights refreshes ZeRO's float32 master copy.

Stages 1 and 2 partition the optimizer state (and gradients); the weights stay whole on every
process. Stage 3 partitions the weights too, the frozen base's included: DeepSpeed gathers each
module's weights in a hook before its forward, so every pass that runs through the modules
(generation, the reference with the adapter switched off, the shared-prefix passes, the critic
and reward adapters) works as on one process; transformers' `generate` keeps the processes in step
(`synced_gpus`). What writes weights outside a forward (a merged sampler, a recast copy) is refused.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch


def requested() -> bool:
    """Whether accelerate launched this process with a DeepSpeed config (its environment flag)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def plugin(accelerator) -> Any:
    """accelerate's DeepSpeed plugin of this run, or None."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def configure(ds_plugin, batch_size: int, minibatch_size: int, world: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config's batch and clipping fields from rlora's per-process layout;
    refuse what the loop cannot run under DeepSpeed, naming the fix."""
    config = ds_plugin.deepspeed_config
    for section, field in (("optimizer", "optimizer.name"), ("scheduler", "scheduler.name")):
        if section in config:
            raise ValueError(f"the DeepSpeed config has a {section!r} section; rlora builds the {section} from its "
                             f"own config ({field} and its kwargs), as accelerate does with a torch {section}: "
                             f"remove the {section!r} section from the DeepSpeed config")
    accumulation = math.ceil(batch_size / minibatch_size)
    config["train_micro_batch_size_per_gpu"] = minibatch_size
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = minibatch_size * accumulation * world
    config["gradient_clipping"] = 0.0 if max_grad_norm is None else float(max_grad_norm)


def stage(ds_plugin) -> int:
    """The ZeRO stage of a DeepSpeed plugin's config (0: none)."""
    return int(ds_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def check_partitionable(config, policy) -> None:
    """Refuse, naming the fix, what cannot run with the weights partitioned (ZeRO stage 3)."""
    if policy.mode != "adapter":
        raise ValueError(f"ZeRO stage 3 partitions the weights; rlora runs it with peft adapters inside the layers "
                         f"(LoRA and the like), and this policy is in {policy.mode} mode (prompt tuning, hydra and "
                         "full fine-tuning save weights that stage 3 does not gather). Set model.peft_config to a "
                         "LoRA config, or use ZeRO stage 2")
    if config.method.merge_adapter_for_generation:
        raise ValueError("method.merge_adapter_for_generation=true writes into weights outside a forward, which ZeRO "
                         "stage 3 partitions; set it to false (the sampler runs the adapter unmerged)")
    if config.model.generation_dtype is not None:
        raise ValueError(f"model.generation_dtype={config.model.generation_dtype!r} samples with a recast copy of the "
                         "weights, which ZeRO stage 3 does not gather; set it to null (sample in model.dtype)")


def engine_of(model: torch.nn.Module) -> Any:
    """`model` if it is DeepSpeed's engine, else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed import DeepSpeedEngine

    return model if isinstance(model, DeepSpeedEngine) else None


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimizer inside accelerate's wrapper `optimizer`, or None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)) else None


def partitions_weights(zero) -> bool:
    """Whether ZeRO optimizer `zero` partitions the weights (stage 3)."""
    return hasattr(zero, "fp32_partitioned_groups_flat")


def gathered(params: list[torch.nn.Parameter], modify: bool = False):
    """A context in which stage 3's partitioned `params` are whole on every process (a no-op for
    whole ones); with `modify`, what process 0 writes into them is partitioned again at its end.
    Every process must enter it."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params, modifier_rank=0 if modify else None)


def full_trainable_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `policy` whole, on the CPU of every process, by parameter name
    (as `rlora.models.sharding.full_trainable_state` gives them); every process must call it."""
    named = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named}


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One microbatch's backward; the step's last microbatch is the accumulation boundary, where
    stage 1 reduces the gradients (stage 2 reduces them as backward goes)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)  # the loss carries rlora's microbatch weight already


def step(engine) -> tuple[torch.Tensor, bool]:
    """The engine's optimizer step: the gradient's global norm (before clipping), clipping to
    `gradient_clipping`, and the update unless that norm is not finite (DeepSpeed's own overflow
    check, the same on every process). Returns the norm and whether the update was applied."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.tensor(float("nan") if norm is None else float(norm)), engine.was_step_applied()


def _flats(zero) -> list[torch.Tensor]:
    """The flat float32 partitions the optimizer inside `zero` steps (its state's keys)."""
    return zero.fp32_partitioned_groups_flat if partitions_weights(zero) else zero.single_partition_of_fp32_groups


def _link(zero) -> None:
    """Point stage 1 and 2's per-parameter fragments at the flat optimizer state (DeepSpeed does
    it at its first step; the fragment API needs it before). Stage 3 reads the flat state itself."""
    if not partitions_weights(zero):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def full_optimizer_state(zero, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """The ZeRO optimizer's state gathered whole on every process, as the torch optimizer built
    over `params` (the run's trainable parameters, in the order it was given them) would save it
    without DeepSpeed; every process must call it. Before the first step it is empty, as torch's is."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer
    if len(base.param_groups) != 1:
        raise ValueError(f"the optimizer has {len(base.param_groups)} parameter groups; rlora builds one")
    hyper = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    first = next((base.state[flat] for flat in _flats(zero) if base.state.get(flat)), None)
    state: dict[int, dict[str, Any]] = {}
    if first is not None:
        keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]  # exp_avg, exp_avg_sq, ...
        scalars = {k: v for k, v in first.items() if k not in keys}  # step
        _link(zero)
        for number, param in enumerate(params):
            state[number] = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()},
                             **{k: safe_get_full_optimizer_state(param, k).cpu() for k in keys}}
    return {"state": state, "param_groups": [{**hyper, "params": list(range(len(params)))}]}


def load_full_optimizer_state(zero, params: list[torch.nn.Parameter], saved: dict[str, Any]) -> None:
    """Load a torch optimizer's whole `state_dict()` over `params` (as `full_optimizer_state`
    writes it, or a run without DeepSpeed) into the ZeRO optimizer, each process keeping its
    partition."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = zero.optimizer
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != [len(params)]:
        raise ValueError(f"the saved optimizer has groups of {sizes} parameters, this run one of {len(params)}: "
                         "resume with the config that wrote it")
    for group in base.param_groups:
        group.update({k: v for k, v in saved["param_groups"][0].items() if k != "params"})  # lr, betas, ...
    first = next((s for s in saved["state"].values() if s), None)
    if first is None:  # saved before its first step
        return
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
    for flat in _flats(zero):
        base.state[flat] = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in first.items() if k not in keys},
                            **{k: torch.zeros_like(flat) for k in keys}}
    _link(zero)
    for number, param in enumerate(params):
        for key in keys if number in saved["state"] else ():  # a parameter that never had a gradient has none
            value = saved["state"][number][key].to(param.device, torch.float32)
            if partitions_weights(zero):
                _set_partition(zero, param, value, key)
            else:
                safe_set_full_optimizer_state(param, value, key)


def _set_partition(zero, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This process's slice of `value` into stage 3's optimizer state `key` of `param`. What
    `safe_set_full_optimizer_state` does, with the zero padding of a parameter whose size does not
    divide by the number of processes (DeepSpeed 0.19.8's own slices past the end of such a value)."""
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank, size = zero._get_param_partition_rank(param), part.numel()
    padded = torch.zeros(size * (rank + 1), dtype=part.dtype, device=part.device)
    flat = value.flatten()[:padded.numel()]
    padded[:flat.numel()] = flat
    part.data.copy_(padded[size * rank:])


def refresh_master_weights(zero) -> None:
    """Copy the model's weights into ZeRO's float32 master partitions (after loading weights into
    the model, which the next step would otherwise overwrite from the stale masters)."""
    zero.refresh_fp32_params()
