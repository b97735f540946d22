"""The base model's trunk read directly: positions from a mask, the last hidden state without
the language-model head, and its width. The value head, the score head and the shared-prefix
passes all read the trunk through these.

Notation: `b` batch, `t` time, `h` width of the hidden states (`hidden_width`).
"""

from __future__ import annotations

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them.

    Shape: attention_mask (b, t) -> (b, t); padding positions get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, **trunk_kwargs) -> torch.Tensor:
    """The trunk's last hidden state (after its final norm) of a causal LM or a peft model on
    one, without the language-model head, with whichever adapters are active. `trunk_kwargs`
    go to the trunk's forward (`past_key_values` and `use_cache=True` to read a cache; without
    them, no cache).

    Shape: (b, t) -> (b, t, h).
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk = lm.base_model  # e.g. GPT2Model under GPT2LMHeadModel; peft's LoRA layers live inside it
    return trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 **{"use_cache": False, **trunk_kwargs}).last_hidden_state


def hidden_width(model: nn.Module) -> int:
    """The width of the trunk's last hidden state (what `last_hidden_state` returns), read from the
    input width of the language-model head, which consumes it.

    Mostly `hidden_size`, but not always: OPT with `word_embed_proj_dim != hidden_size` (opt-350m:
    512 and 1024) projects its last hidden state down (`project_out`) before the head.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no language-model head whose input width gives the width of "
                         "its last hidden state; rlora needs a causal LM (AutoModelForCausalLM)")
    # (v, h): also through peft's LoRA and modules_to_save wrappers, and partitioned by ZeRO-3 (whose
    # weights loaded under its zero.Init hold a slice and keep their whole shape in ds_shape)
    return getattr(head.weight, "ds_shape", head.weight.shape)[-1]
