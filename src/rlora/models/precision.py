"""Mixed precision over a bf16 base: the float32 adapters compute in bf16.

With `model.dtype: bfloat16` the frozen base is bf16 while peft keeps the adapters (and rlora the
value head) in float32, so that their gradients and AdamW's moments keep float32's precision.
peft's LoRA layer then upcasts each input to float32, runs both low-rank products in float32 and
adds a float32 delta to the bf16 output: on SmolLM2-135M that is a (tokens, width) float32
copy, product, scale and sum per adapted layer, most of a bf16 update's time that is not a base
matrix product. Under bf16 autocast, with peft's input cast turned off (peft's own switch,
`peft.helpers.disable_input_dtype_casting`), those products take bf16 copies of the small
adapter weights instead and the delta is added in bf16, as the base's outputs are: the mixed
precision that accelerate's and TRL's `bf16` settings give, the weights staying float32.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

__all__ = ["bf16_adapter_compute", "pass_precision"]


@contextmanager
def bf16_adapter_compute(model: nn.Module, device_type: str) -> Iterator[None]:
    """Runs what is inside under bf16 autocast with peft's input casts off in `model`'s adapter
    layers (restored on exit: outside it, peft's float32 upcast applies again). Attention keeps
    its own precision (`model.attention_dtype` disables autocast inside) and the value head stays
    float32 (it does too)."""
    with torch.autocast(device_type, dtype=torch.bfloat16), disable_input_dtype_casting(model):
        yield


def pass_precision(accelerator, model: nn.Module, adapter_compute_dtype: str):
    """The context a trainer runs each pass in: accelerate's autocast when its mixed precision is
    on (`train.mixed_precision`); else, over a bf16 base, `bf16_adapter_compute` unless
    `model.adapter_compute_dtype` is "float32"; else none (a float32 model runs as it is)."""
    if accelerator.mixed_precision != "no":
        return accelerator.autocast()
    if model.dtype == torch.bfloat16 and adapter_compute_dtype == "model":
        return bf16_adapter_compute(model, accelerator.device.type)
    return nullcontext()
