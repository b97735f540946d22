"""Attention of a low-precision model computed in float32 on CPU (`model.attention_dtype`).

torch's CPU flash-attention kernel is slow in bfloat16 backward: at a SmolLM2-135M update's
shapes (32 x 9 heads, 15 queries over 52 keys, head 64) forward + backward takes 11.5 ms in bf16
against 2.6 ms with float32 inputs, and it was a quarter of a bf16-weights GRPO update. Attention
holds no weights, so computing it in float32 costs two casts of q, k, v and one of the output,
and rounds less. Registered with transformers' `AttentionInterface` (and its mask interface) under
`FLOAT32_SDPA`, so every pass of the model, whatever role or copy, runs the same function.
"""

from __future__ import annotations

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


def float32_attention(setting: str | None, model: nn.Module) -> bool:
    """Compute the attention of a transformers `model` in float32 as `model.attention_dtype=setting`
    says: "float32" always for a bf16 / fp16 model; None (the default) while its tensors are on
    CPU; "model" never. Returns whether it switched: a float32 model, or one whose attention is
    not transformers' pluggable SDPA, keeps its own."""
    if setting not in ATTENTION_DTYPES:
        raise ValueError(f"model.attention_dtype={setting!r}: use null (float32 on CPU for a bf16 model), "
                         "'float32' (always), or 'model' (the model's own precision)")
    if setting == "model" or model.dtype == torch.float32:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    _register()
    name = FLOAT32_SDPA if setting == "float32" else FLOAT32_SDPA_ON_CPU
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name
