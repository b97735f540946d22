"""Activation checkpointing: transformers' own, non-reentrant, in every pass with gradients
(`model.gradient_checkpointing`, docs/design.md §12).

transformers checkpoints a decoder layer only while the layer is in train mode, but rlora's loop
runs every pass in eval mode (dropout off, so the ratio starts at exactly 1). `checkpointing`
therefore marks the checkpointable layers themselves as training for the update's pass, and
nothing under them: their dropout stays off. Sampling and the no-grad passes never checkpoint.

A checkpointed layer runs twice, the second time in the backward pass. The shared-prefix pass
(`rlora.rollout.forward.forward_group_responses`) runs its layers with a cache, which a replay
must not grow: `PrefixCache` is filled once by the prompt pass and only read by the completions'
pass, so a replayed layer sees what it saw the first time.

Notation: `n` prompts, `b` rows (`n * G`), `p` prompt length, `t` new tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


def enable(model: nn.Module) -> None:
    """Turn on transformers' non-reentrant checkpointing of `model`'s decoder layers (a no-op for
    a model without them, which `checkpointed_layers` then reports as none)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} does not support transformers' "
                         "gradient checkpointing; set model.gradient_checkpointing: false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers checkpoints when they train."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@contextmanager
def checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within this block, `model`'s checkpointable layers recompute their activations in the
    backward pass instead of keeping them: each such layer (not its children) is marked
    training, and may read a cache (`PrefixCache`). Restored after, whatever happens."""
    layers = checkpointed_layers(model) if enabled and torch.is_grad_enabled() else []
    saved = [(m.training, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers]
    try:
        for m in layers:
            m.training = True  # only the layer's own flag: dropout under it stays in eval mode
            m._can_checkpoint_with_cache = True  # the shared prefix's cache is read-only in a replay
        yield
    finally:
        for m, (training, can) in zip(layers, saved):
            m.training = training
            if can is None:
                m.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                m._can_checkpoint_with_cache = can


class _PrefixLayer(DynamicLayer):
    """One layer's cache of a shared prefix: set by the prompt pass, then read without being
    written, so a checkpointed layer's replay computes what its first run computed."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # the prompt pass: its keys are the layer's cache
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        if key_states.shape[0] != self.keys.shape[0]:  # the prompt pass replayed: (n, ...) before the repeat
            return key_states, value_states
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


class PrefixCache(DynamicCache):
    """A prompt's key/value cache for one more forward over what follows it (the completions):
    the prompt pass fills it, `batch_repeat_interleave` repeats it to the group, and the next
    pass reads it without adding its own keys. Not for `generate`, which grows its cache.
    Shape: each layer (n, heads, p, head_dim), then (b, heads, p, head_dim) once repeated."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = _PrefixLayer
