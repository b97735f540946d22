"""Shared prefixes: run each prompt once and repeat its key/value cache to the rows of its group.

The group methods put `G` (`num_generations`) rows of one prompt side by side, rows
`i*G .. (i+1)*G - 1` holding prompt i. Sampling them (`Policy.generate`) and the passes over
what was sampled (`rlora.rollout.forward.forward_group_responses`) would each run a prompt's
tokens G times; instead the prompt runs once into a KV cache that is repeated along the batch,
and the rows continue from it. The repeat is an autograd op, so in a training pass the G rows'
gradients sum back into the one prompt pass. The idea is the shared-prefix forward of Prefix
Grouper (Liu et al. 2025, arXiv 2506.05433).

`repeated_prompt_cache` builds the cache, `can_share_prefix` is the one rule for when it applies.

Notation: `n` prompts, `G` rows per prompt, `b = n * G` rows, `p` prompt length.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rlora.models.checkpointing import PrefixCache
from rlora.models.trunk import position_ids_from_mask


def repeated_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int,
                          cache_config=None, **model_kwargs):
    """Run `model` once over the prompts into a fresh `DynamicCache`, then repeat the cache
    `num_generations` times along the batch; returns the cache and `model`'s output.

    `model` is whatever the caller needs from the prompt pass: the trunk alone when only the
    cache is wanted (sampling), the causal LM with `logits_to_keep` in `model_kwargs` when the
    last prompt positions' logits are wanted too (a pass over responses). `cache_config` is
    the model's text config for a cache `generate` continues on, laid out as `generate` would
    build it (sliding-window layers included); None for a cache read by one more forward, which
    does not grow it (`PrefixCache`: a checkpointed layer's replay reads what it first read).
    Positions count real tokens only (`position_ids_from_mask`).
    Shape: prompts (n, p) -> cache of (n * G, heads, p, head_dim) per layer.
    """
    cache = PrefixCache() if cache_config is None else DynamicCache(config=cache_config)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                past_key_values=cache, use_cache=True, **model_kwargs)
    cache.batch_repeat_interleave(num_generations)  # (n, ...) -> (n * G, ...) keys and values of every layer
    return cache, out


def shares_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor, num_generations: int) -> bool:
    """Whether the batch is whole groups of `num_generations` rows, each group one prompt: the
    same mask and the same ids on it (pad ids may differ).

    Shape: query_ids, query_mask (b, p) -> bool.
    """
    b = query_ids.shape[0]
    if num_generations < 2 or b % num_generations:
        return False
    ids = query_ids.reshape(b // num_generations, num_generations, -1)  # (n, G, p)
    mask = query_mask.bool().reshape(b // num_generations, num_generations, -1)
    return bool((mask == mask[:, :1]).all() and ((ids == ids[:, :1]) | ~mask).all())


def can_share_prefix(policy, num_generations: int, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                     response_ids: torch.Tensor | None = None, with_policy: bool = True, generation_config=None,
                     generate_kwargs: dict | None = None) -> bool:
    """Whether `num_generations` rows per prompt can run each prompt once on `policy` and go on
    from its repeated cache.

    Always: groups of at least two rows, and prompts the model reads as plain tokens (not with
    prompt or prefix tuning, whose virtual tokens peft adds itself).

    Sampling (`response_ids` None; `prompt_ids` one row per prompt): prompts of at least two
    tokens (the last runs in `generate`, which continues the cache from it), and a `generate`
    that samples each row once on a dynamic cache (`generation_config`, default the model's
    own, and `generate_kwargs`): not under ZeRO-3's `synced_gpus`, with beam search,
    `num_return_sequences`, assisted decoding or classifier-free guidance (they expand or run
    the batch themselves), without a KV cache, or with another `cache_implementation`
    (transformers builds a static, offloaded or quantized cache itself).

    A pass over sampled responses (`response_ids` given; `prompt_ids` and `prompt_mask` one row
    per completion): rows in whole groups that share their prompt (`shares_prompts`), at least
    one response token, not in hydra mode (its reference reads every row's hidden states), no
    value head when the policy's own pass runs (`with_policy`: its values need every row's
    pass), and no sliding attention window shorter than prompt plus response (the pad keys
    between prompt and completion would count towards it).
    """
    if num_generations < 2 or policy.mode == "prompt":
        return False
    if response_ids is None:
        config = generation_config if generation_config is not None else policy.base_model.generation_config
        kwargs = generate_kwargs or {}
        # transformers leaves unset fields None: one beam, one sequence, a cache
        return (not kwargs.get("synced_gpus") and prompt_ids.shape[1] >= 2
                and (config.num_beams or 1) == 1 and (config.num_return_sequences or 1) == 1
                and config.use_cache is not False and config.cache_implementation in (None, "dynamic")
                and all(kwargs.get(k) is None for k in ("assistant_model", "negative_prompt_ids")))
    window = getattr(policy.base_model.config.get_text_config(), "sliding_window", None)
    return (policy.mode != "hydra" and not (with_policy and policy.value_head is not None)
            and not (isinstance(window, int) and window < prompt_ids.shape[1] + response_ids.shape[1])
            and response_ids.shape[1] > 0 and shares_prompts(prompt_ids, prompt_mask, num_generations))
