"""The hydra branch: a frozen copy of the top N decoder blocks, final norm and lm_head.

With `model.num_layers_unfrozen = N > 0` and no PEFT, the policy trains its top N blocks;
the reference model for the KL penalty is the original model, which differs from the policy
only above block `L - N`. The branch reuses the policy's hidden state `-(N+1)` (the input to
block `L - N`, identical in both since the bottom is frozen) and runs only a frozen copy of
the top, so the reference costs N blocks, not L, and one copy of the bottom is kept.

The branch is the Hugging Face model itself, structurally copied with its block list cut to
the top N: its own `forward` runs, so no forward code is copied here. That forward transforms
its input embeddings before the first block in ways that differ by architecture (GPT-2 and OPT
add position embeddings, OPT projects them up with `project_in`, Bloom normalises them with
`word_embeddings_layernorm`), while the hidden state `-(N+1)` has had all of that already. So the
branch is fed zeros of the input embeddings' shape through `inputs_embeds` (the model derives
masks and positions as usual), and a forward pre-hook hands the first kept block the hidden
state itself as its input: the top blocks see exactly what they see in the base model.

Notation: `b` batch, `t` time, `h` hidden size, `v` vocabulary.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn


def find_decoder_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Locate the list of decoder blocks of a Hugging Face causal LM.

    Returns `(parent, attribute_name, blocks)`: the longest `nn.ModuleList` whose length is
    the config's layer count (GPT-2 `transformer.h`, Llama `model.layers`, GPT-NeoX
    `gpt_neox.layers`, OPT `model.decoder.layers`, ...).
    """
    n_layers = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n_layers:
                return module, attr, child
    raise ValueError(
        f"could not find a list of {n_layers} decoder blocks in {type(model).__name__}; "
        "the hydra reference (model.num_layers_unfrozen > 0) needs a standard Hugging Face decoder. "
        "Use a PEFT adapter (model.peft_config) or num_layers_unfrozen=-1 instead."
    )


class HydraBranch(nn.Module):
    """Frozen copy of the top `num_layers` blocks + final norm + lm_head of `model`."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        parent, attr, blocks = find_decoder_blocks(model)
        if not 0 < num_layers < len(blocks):
            raise ValueError(
                f"model.num_layers_unfrozen={num_layers} must be between 1 and {len(blocks) - 1} "
                f"for a model with {len(blocks)} blocks (use -1 to train the whole model)"
            )
        self.num_layers = num_layers
        input_embeddings = model.get_input_embeddings()
        # Share what the branch never changes: the bottom blocks (cut out while copying) and the
        # input embeddings (never called: the branch is fed `inputs_embeds`).
        shared = {id(p): p for p in input_embeddings.parameters()}
        parent._modules[attr] = nn.ModuleList(list(blocks)[-num_layers:])
        try:
            branch = copy.deepcopy(model, memo=shared)
        finally:
            parent._modules[attr] = blocks
        branch.requires_grad_(False)
        branch.eval()
        self.model = branch
        parent_name = next(name for name, module in model.named_modules() if module is parent)
        self.first_block = f"{parent_name}.{attr}.0".lstrip(".")  # its path in the branch
        self.embedding_dim = input_embeddings.embedding_dim  # OPT's project_in: not the hidden size

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Reference logits from the input of block `L - N`.

        Shape: hidden (b, t, h), attention_mask (b, t), position_ids (b, t) -> logits (b, t or k, v).
        """
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        placeholder = hidden.new_zeros(*hidden.shape[:-1], self.embedding_dim)  # (b, t, e), replaced below
        block = self.model.get_submodule(self.first_block)
        handle = block.register_forward_pre_hook(functools.partial(_as_block_input, hidden), with_kwargs=True)
        try:
            out = self.model(inputs_embeds=placeholder, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **keep)
        finally:
            handle.remove()
        return out.logits


def _as_block_input(hidden: torch.Tensor, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: `hidden` replaces the block's input hidden states (its first argument)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
