"""Scoring groups of completions with each prompt run once per group (issue #15).

Group methods (GRPO, RLOO, ...) sample G completions of each prompt, in contiguous rows:
rows `i*G .. (i+1)*G - 1` hold prompt i. `forward_responses` runs every row's prompt again.
`forward_group_responses` runs each prompt once, with gradients, keeps its key/value cache,
repeats that cache G times along the batch and runs the G completions on it. The repeat is
an autograd op, so the G completions' gradients sum back into the one prompt pass: the same
log-probs and gradients as `forward_responses`, from b / G prompt rows instead of b.
The idea is the shared-prefix forward of Prefix Grouper (Liu et al. 2025, arXiv 2506.05433).

Layout. Prompts are packed to the left as in `pack_sequences` (`[prompt | pad]`), so the prompt
pass has no left padding and its positions are those of the unshared pass. The completions
then see keys `[prompt | pad | completion]`; the pad keys are masked and the completions'
positions continue from each prompt's own length, so every real token has the position and
causal context it has in `forward_responses`.

Notation: `b` batch, `n` prompts (b / G), `G` group size, `p` prompt length, `r` response
length, `v` vocabulary.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rlora.algo import logprobs_and_entropy, logprobs_of_labels, token_entropy
from rlora.models.trunk import position_ids_from_mask
from rlora.rollout.forward import ResponseOutputs, forward_responses, pack_sequences

SHARING_MODES = ("adapter", "full")  # prompt learning prepends virtual tokens; hydra's reference reads hidden states


def shares_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor, group_size: int) -> bool:
    """Whether the batch is whole groups of `group_size` rows, each group one prompt: the same
    mask and the same ids on it (pad ids may differ).

    Shape: query_ids, query_mask (b, p) -> bool.
    """
    b = query_ids.shape[0]
    if group_size < 2 or b % group_size:
        return False
    ids = query_ids.reshape(b // group_size, group_size, -1)  # (n, G, p)
    mask = query_mask.bool().reshape(b // group_size, group_size, -1)
    return bool((mask == mask[:, :1]).all() and ((ids == ids[:, :1]) | ~mask).all())


def can_share(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
              group_size: int, with_policy: bool = True) -> bool:
    """Whether `forward_group_responses` shares the prompt passes for this batch, rather than
    calling `forward_responses`.

    It does not with a value head (its values need every row's pass; group methods have none),
    in prompt-learning and hydra modes, for group size 1, for rows whose groups do not share
    their prompt, and on models with a sliding attention window shorter than prompt plus
    response (the pad keys between prompt and completion would count towards the window).
    """
    config = policy.base_model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    return (policy.mode in SHARING_MODES and not (with_policy and policy.value_head is not None)
            and not (isinstance(window, int) and window < query_ids.shape[1] + response_ids.shape[1])
            and response_ids.shape[1] > 0 and shares_prompts(query_ids, query_mask, group_size))


def forward_group_responses(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                            response_mask: torch.Tensor, group_size: int, with_reference: bool = False,
                            temperature: float = 1.0, with_policy: bool = True,
                            with_entropy: bool = False) -> ResponseOutputs:
    """`forward_responses` for a batch of groups, each prompt run once per group (module docstring).

    The same fields, from the same distribution `softmax(logits / temperature)`; where sharing
    does not apply (`can_share`), it is `forward_responses` itself. Outputs at padded response
    positions are unspecified, as there. In train mode, dropout in a prompt is drawn once per
    group rather than once per row.
    Shape: query (b, p), response (b, r), b a multiple of `group_size` -> each (b, r).
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; give the number of completions per prompt, an integer >= 1")
    if not can_share(policy, query_ids, query_mask, response_ids, group_size, with_policy):
        return forward_responses(policy, query_ids, query_mask, response_ids, response_mask,
                                 with_reference=with_reference, temperature=temperature, with_policy=with_policy,
                                 with_entropy=with_entropy)
    b = query_ids.shape[0]
    empty = response_ids[::group_size, :0]  # (n, 0): `pack_sequences` of the prompts alone
    prompt_ids, prompt_mask, lengths = pack_sequences(query_ids[::group_size], query_mask[::group_size], empty,
                                                      response_mask[::group_size, :0])  # (n, p), (n, p), (n,)
    logprobs = entropy = ref_logprobs = None
    if with_policy:
        last, tail = _group_pass(policy.lm, prompt_ids, prompt_mask.long(), lengths, response_ids, response_mask,
                                 group_size)
        logprobs, entropy = _label_logprobs(last, tail, response_ids, group_size, temperature, with_entropy)
    if with_reference:
        with torch.no_grad(), policy.reference() as ref:
            last, tail = _group_pass(ref, prompt_ids, prompt_mask.long(), lengths, response_ids, response_mask,
                                     group_size)
        ref_logprobs, _ = _label_logprobs(last, tail, response_ids, group_size, temperature)
    assert all(x is None or x.shape == (b, response_ids.shape[1]) for x in (logprobs, ref_logprobs, entropy))
    return ResponseOutputs(logprobs, None, ref_logprobs, entropy)


def _group_pass(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, lengths: torch.Tensor,
                response_ids: torch.Tensor, response_mask: torch.Tensor,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One causal LM (the policy, or the reference) over the prompts once and the completions on
    their repeated cache. Returns the logits at each prompt's last token, which predict the first
    response token, and the completions' logits, which predict the rest (None for r = 1: the
    last response token predicts nothing scored, so it is not run).

    Shape: prompts (n, p) packed left, lengths (n,), response (b, r) -> (n, v), (b, r - 1, v).
    """
    first = int(lengths.min()) - 1
    keep = torch.arange(first, int(lengths.max()), device=lengths.device)  # the LM head runs here only
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=keep)
    index = (lengths - 1 - first)[:, None, None].expand(-1, 1, out.logits.shape[-1])  # (n, 1, v)
    last = out.logits.gather(1, index).squeeze(1)  # (n, v)
    if response_ids.shape[1] == 1:
        return last, None
    cache.batch_repeat_interleave(group_size)  # (n, ...) -> (b, ...) keys and values of every layer, in the graph
    ids, mask = response_ids[:, :-1], response_mask[:, :-1].long()  # (b, r - 1)
    # positions continue each prompt's count; pads repeat the last real one, as `position_ids_from_mask`
    positions = lengths.repeat_interleave(group_size)[:, None] + position_ids_from_mask(mask)  # (b, r - 1)
    keys_mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), mask], 1)  # (b, p + r - 1)
    tail = model(input_ids=ids, attention_mask=keys_mask, position_ids=positions, past_key_values=cache,
                 use_cache=True).logits  # (b, r - 1, v)
    return last, tail


def _label_logprobs(last: torch.Tensor, tail: torch.Tensor | None, response_ids: torch.Tensor, group_size: int,
                    temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens: the first from its prompt's last logits (one row per
    group, repeated for its G labels), the rest from the completions' logits; with
    `with_entropy`, the entropy at each of those positions too (else None).

    Shape: last (n, v), tail (b, r - 1, v) or None, response_ids (b, r) -> (b, r), (b, r).
    """
    n, v = last.shape
    firsts = response_ids[:, 0].reshape(n, group_size)  # (n, G)
    first = logprobs_of_labels(last[:, None].expand(n, group_size, v), firsts, temperature).reshape(-1, 1)  # (b, 1)
    first_entropy = token_entropy(last[:, None], temperature).repeat_interleave(group_size, 0) if with_entropy \
        else None  # (b, 1)
    if tail is None:
        return first, first_entropy
    labels = response_ids[:, 1:]
    if not with_entropy:
        return torch.cat([first, logprobs_of_labels(tail, labels, temperature)], 1), None
    logprobs, entropy = logprobs_and_entropy(tail, labels, temperature)
    return torch.cat([first, logprobs], 1), torch.cat([first_entropy, entropy], 1)
