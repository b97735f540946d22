"""Mixed precision over a bf16 base: the float32 adapters compute in bf16.

With `model.dtype: bfloat16` the frozen base is bf16 while peft keeps the adapters (and rlora the
value head) in float32, so that their gradients and AdamW's moments keep float32's precision.
peft's LoRA layer then upcasts each input to float32, runs both low-rank products in float32 and
adds a float32 delta to the bf16 output: a (tokens, width) float32 copy, product, scale and sum
per adapted layer, a sizeable share of a small model's update (BENCHMARKS.md). Under bf16
autocast, with peft's input cast turned off (its layers' `cast_input_dtype_enabled` switch, the
one `peft.helpers.disable_input_dtype_casting` sets), those products take bf16 copies of the small
adapter weights instead and the delta is added in bf16, as the base's outputs are: the mixed
precision that accelerate's and TRL's `bf16` settings give, the weights staying float32. Adapter
layers without the switch (peft's IA3, VeRA, trainable tokens, ...) keep their own casts and run
under the same autocast.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

__all__ = ["bf16_adapter_compute", "pass_precision"]


@contextmanager
def bf16_adapter_compute(model: nn.Module, device_type: str) -> Iterator[None]:
    """Runs what is inside under bf16 autocast with peft's input casts off in `model`'s adapter
    layers (restored on exit: outside it, peft's float32 upcast applies again). Attention keeps
    its own precision (`model.attention_dtype` disables autocast inside), and the value head and
    the reward adapter's score head stay float32 (they do too)."""
    switched = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", False) is True]
    try:
        for layer in switched:
            layer.cast_input_dtype_enabled = False
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        for layer in switched:
            layer.cast_input_dtype_enabled = True


def pass_precision(accelerator, model: nn.Module, adapter_compute_dtype: str,
                   weights_dtype: torch.dtype | None = None):
    """The context a trainer runs each pass in: accelerate's autocast when its mixed precision is
    on (`train.mixed_precision`); else, over a bf16 base, `bf16_adapter_compute` unless
    `model.adapter_compute_dtype` is "float32"; else none (a float32 model runs as it is). A pass
    on weights recast to float32 (`weights_dtype`: a `model.generation_dtype: float32` sampler)
    runs without autocast, which would multiply them in bf16 again."""
    if weights_dtype is not None and weights_dtype != torch.bfloat16:
        return torch.autocast(accelerator.device.type, enabled=False)
    if accelerator.mixed_precision != "no":
        return accelerator.autocast()
    if model.dtype == torch.bfloat16 and adapter_compute_dtype == "model":
        return bf16_adapter_compute(model, accelerator.device.type)
    return nullcontext()
