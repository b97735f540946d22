"""A quantized frozen base (QLoRA): the one base every role runs on, held in 4 bits (or 8) by
bitsandbytes, with the adapters, the value head and the score head in float32 beside it.

`model.quantization` names the format: "nf4" (QLoRA's NormalFloat, Dettmers et al. 2023, §3) or
"fp4" in 4 bits, "int8" (LLM.int8(), Dettmers et al. 2022). The 4-bit formats use double
quantization (the per-block scales quantized once more, §3 "Double Quantization": about 0.37 bits
a parameter saved, at no measurable loss in the paper) and compute in `model.dtype` ("float32",
or "bfloat16"; "auto" computes in float32). A `BitsAndBytesConfig` (or its dict) given as
`model.model_extra_configs.quantization_config` is passed to `from_pretrained` as it is, for
settings these presets do not cover.

peft's `prepare_model_for_kbit_training` is not called: it turns on gradient checkpointing and
input gradients (`model.gradient_checkpointing` decides those) and upcasts every non-quantized
weight to float32, which a float32 base already is and a bf16 base keeps bf16 by choice, as
without quantization. The base is frozen either way.

What cannot run on a quantized base is refused in `rlora.config.validation` (and, for a model
given already quantized, where it would run): merging the adapter into 4-bit weights rounds the
merged weight back to 4 bits, so the merged sampler and `model.generation_dtype` recasts sample
on the unmerged adapter instead; the hydra and full-model modes would train the quantized blocks.
`rlora export` merges into the dequantized base (`dequantized`).

On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight in place the first
time the layer runs in eval mode on an input without gradient (generation, the rollout pass), and
from then on computes it with a bf16 kernel that has no backward: the layer silently passes no
gradient to its input, so the adapters below it train on a wrong gradient, and the sampler's
log-probs differ from the learner's. `keep_trainable` turns that path off on every layer of a base
rlora trains on.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("nf4", "fp4", "int8")
INSTALL = "pip install 'rlora[quant]'"


def require_bitsandbytes(key: str) -> None:
    """A clear ImportError naming `key` and the extra to install when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{key} quantizes the base with bitsandbytes, which is not installed; install it with "
                          f"`{INSTALL}` (or set {key} to null for an unquantized base)")


def quantization_config(model_config) -> Any:
    """The `BitsAndBytesConfig` that `model.quantization` names (None when it is null)."""
    name = model_config.quantization
    if name is None:
        return None
    require_bitsandbytes("model.quantization")
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if model_config.dtype == "bfloat16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=True)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds bitsandbytes-quantized weights."""
    return any(getattr(p, "quant_state", None) is not None or type(p).__name__ in ("Params4bit", "Int8Params")
               for p in model.parameters())


def keep_trainable(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of `model` on bitsandbytes' differentiable kernel: switch off the
    CPU inference path that repacks the weight in place (see the module docstring), and unpack a
    weight that path packed already. Returns `model`."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
    return model


def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with every quantized layer replaced by a plain `nn.Linear` holding its dequantized
    weight, then cast to `dtype` (transformers' `dequantize`, which also drops the model's
    `quantization_config`). The weights are exactly those the quantized layers multiply by, so
    a float32 result computes what the quantized model did, to float rounding."""
    model = model.dequantize(dtype=torch.float32) if _takes_dtype(model.dequantize) else model.dequantize()
    return model.to(dtype)


def _takes_dtype(fn) -> bool:
    import inspect

    return "dtype" in inspect.signature(fn).parameters


__all__ = ["INSTALL", "QUANTIZATIONS", "dequantized", "is_quantized", "keep_trainable", "quantization_config",
           "require_bitsandbytes"]
