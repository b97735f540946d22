"""Attention of a low-precision model computed in float32 on CPU (`model.attention_dtype`).

torch's CPU flash-attention kernel is slow in bfloat16 backward, slower than on float32 inputs
at a small model's update shapes, where it weighs on a bf16-weights update (BENCHMARKS.md,
one-off measurements). Attention holds no weights, so computing it in float32 costs a cast of q, k and v and one of the output
(and their reverse for the gradients), and rounds less. Registered with transformers'
`AttentionInterface` (and its mask interface) under its own names, so every pass of the model,
whatever role or copy, runs the same function. (The bf16 sampler of a float32 model,
`model.generation_dtype`, samples on a copy that keeps bf16 SDPA: forward only, where it is fast.)
"""

from __future__ import annotations

import inspect
import re
import sys

import torch
from torch import nn

FLOAT32_SDPA = "rlora_sdpa_float32"  # always
FLOAT32_SDPA_ON_CPU = "rlora_sdpa_float32_on_cpu"  # on CPU tensors; elsewhere the model's precision
ATTENTION_DTYPES = (None, "float32", "model")


def _sdpa_in_float32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *args, only_on_cpu: bool = False, **kwargs):
    """transformers' SDPA attention on float32 copies of a bf16 / fp16 query, key and value; the
    output in their dtype (the attention weights SDPA returns are None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32 or (only_on_cpu and query.device.type != "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    with torch.autocast(query.device.type, enabled=False):  # bf16 autocast would cast SDPA's inputs back
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              *args, **kwargs)
    return out.to(dtype), weights


def _sdpa_in_float32_on_cpu(*args, **kwargs):
    return _sdpa_in_float32(*args, only_on_cpu=True, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ((FLOAT32_SDPA, _sdpa_in_float32), (FLOAT32_SDPA_ON_CPU, _sdpa_in_float32_on_cpu)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def _tests_for_sdpa(model: nn.Module) -> bool:
    """Whether `model`'s modeling code branches on its attention being named "sdpa" (Falcon,
    Gemma 4, ...): under another name it would take the other branch."""
    source = inspect.getsource(sys.modules[type(model).__module__])
    return re.search(r"""_attn_implementation\s*[!=]=\s*["']sdpa["']""", source) is not None


def float32_attention(setting: str | None, model: nn.Module) -> bool:
    """Compute the attention of a transformers `model` in float32 as `model.attention_dtype=setting`
    says: "float32" always for a bf16 / fp16 model; None (the default) while its tensors are on
    CPU; "model" never. Returns whether it switched: a float32 model, one whose attention is not
    transformers' pluggable SDPA, or one whose code tests for the name "sdpa" keeps its own. It
    takes precedence over an `attn_implementation: sdpa` in `model.model_extra_configs` (the two
    cannot be told apart); `attention_dtype: model` keeps that."""
    if setting not in ATTENTION_DTYPES:
        raise ValueError(f"model.attention_dtype={setting!r}: use null (float32 on CPU for a bf16 model), "
                         "'float32' (always), or 'model' (the model's own precision)")
    if setting == "model" or model.dtype == torch.float32:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation() \
            or _tests_for_sdpa(model):
        return False
    _register()
    name = FLOAT32_SDPA if setting == "float32" else FLOAT32_SDPA_ON_CPU
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name
