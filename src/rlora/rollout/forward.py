"""The pass over a batch of sampled responses: prompt and response packed side by side, and the
policy's (and the reference's) per-token outputs on the response tokens; for the group methods
with each group's prompt run once (`forward_group_responses`).

Notation: `b` batch, `n` prompts (b / G), `G` completions per prompt (`num_generations`), `p`
prompt length, `r` response length, `v` vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import extract_model_from_parallel

from rlora.algo import logprobs_of_labels, token_entropy
from rlora.models.lm_head import label_logprobs
from rlora.models.shared_prefix import can_share_prefix, repeated_prompt_cache
from rlora.models.trunk import last_hidden_state, position_ids_from_mask


def pack_sequences(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt and response of each row side by side, all padding moved to the right.

    Generation needs left-padded prompts; scoring does not, and with every pad at the end a
    token's position and its causal context do not depend on how much padding its batch
    holds. That keeps the rollout pass and the update in agreement even for prompt learning,
    where peft drops `position_ids`.
    Shape: query (b, p), response (b, r) -> ids (b, p + r), mask (b, p + r), starts (b,) where
    `starts[i]` is the index of row i's first response token.
    """
    ids = torch.cat([query_ids, response_ids], dim=1)  # (b, p + r), [pad | prompt | response | pad]
    mask = torch.cat([query_mask, response_mask], dim=1)
    width = ids.shape[1]
    n_pad = query_ids.shape[1] - query_mask.sum(1)  # (b,) left padding of each prompt
    roll = (torch.arange(width, device=ids.device)[None, :] + n_pad[:, None]) % width  # (b, p + r)
    return ids.gather(1, roll), mask.gather(1, roll), query_mask.sum(1)


class ResponseOutputs(NamedTuple):
    """What one pass over a batch of responses gives, each (b, r) aligned with `response_ids`."""

    logprobs: torch.Tensor | None  # the policy's; None with `with_policy=False`
    values: torch.Tensor | None  # the value head's; None without one (group methods)
    ref_logprobs: torch.Tensor | None  # the reference's, with `with_reference=True`
    entropy: torch.Tensor | None  # the policy's token entropy (no gradient), with `with_entropy=True`


def forward_responses(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                      response_mask: torch.Tensor, with_reference: bool = False, temperature: float = 1.0,
                      with_policy: bool = True, with_entropy: bool = False) -> ResponseOutputs:
    """Policy logprobs and values of each response token, and optionally the reference's logprobs
    and the policy's entropy, all of `softmax(logits / temperature)`: the sampling temperature of
    the responses. `with_policy=False` runs the reference only (the rollout pass of a one-epoch
    group method with a KL term).

    The value at a response token is the one predicted at the position before it (the state
    the token was sampled from), as trlx. Where the policy's head is plain (`chunked_head`), the
    head runs a chunk of positions at a time (`rlora.models.lm_head`): no (b, t, v) logits.
    `policy` may be the policy in the wrapper that runs its forward (DDP, DeepSpeed's engine);
    the chunked head runs outside that forward, so callers run this under the run's precision.
    Shape: query (b, p), response (b, r) -> each (b, r).
    """
    input_ids, attention_mask, starts = pack_sequences(query_ids, query_mask, response_ids, response_mask)
    attention_mask = attention_mask.long()
    r = response_ids.shape[1]
    before = starts[:, None] - 1 + torch.arange(r, device=starts.device)[None, :]  # (b, r) positions predicting
    first = int(starts.min()) - 1
    keep = torch.arange(first, int(starts.max()) - 1 + r, device=starts.device)  # the LM head runs here only

    def at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (b, t, ...) -> (b, r, ...)
        index = positions.reshape(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    # Each response token's label is placed at the kept position predicting it, so the (b, k, v)
    # logits are used where they lie: no rearranged full-vocabulary copy (kept for backward).
    # Kept positions that predict no response token get label 0 and are dropped by `at`.
    labels = torch.zeros(len(keep), dtype=response_ids.dtype, device=response_ids.device).expand(
        response_ids.shape[0], -1).scatter(1, before - first, response_ids)  # (b, k)
    unwrapped = extract_model_from_parallel(policy)
    chunked = unwrapped.chunked_head()
    out = logprobs = values = entropy = ref_logprobs = None
    if with_policy:
        out = policy(input_ids, attention_mask, logits_to_keep=keep, head=not chunked)
        head, x = (unwrapped.base_model.get_output_embeddings(), out.hidden_states[-1][:, keep]) if chunked \
            else (None, out.logits)  # (b, k, h) or (b, k, v)
        logprobs, entropy = label_logprobs(head, x, labels, temperature, with_entropy)
        logprobs, entropy = at(logprobs, before - first), None if entropy is None else at(entropy, before - first)
        values = None if out.values is None else at(out.values, before)
    if with_reference and chunked:
        with torch.no_grad(), unwrapped.reference() as ref:
            hidden = last_hidden_state(ref, input_ids, attention_mask)[:, keep]  # (b, k, h)
            ref_logprobs, _ = label_logprobs(ref.get_output_embeddings(), hidden, labels, temperature)
        ref_logprobs = at(ref_logprobs, before - first)
    elif with_reference:
        ref_logits = unwrapped.reference_logits(input_ids, attention_mask, policy_output=out, logits_to_keep=keep)
        ref_logprobs = at(logprobs_of_labels(ref_logits, labels, temperature), before - first)
    return ResponseOutputs(logprobs, values, ref_logprobs, entropy)


def forward_group_responses(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                            response_mask: torch.Tensor, num_generations: int, with_reference: bool = False,
                            temperature: float = 1.0, with_policy: bool = True,
                            with_entropy: bool = False) -> ResponseOutputs:
    """`forward_responses` for a batch of groups of `num_generations` rows, each group's prompt
    run once (`rlora.models.shared_prefix`): the same log-probs and gradients up to float
    rounding, from b / G prompt rows instead of b.

    Prompts are packed to the left as in `pack_sequences` (`[prompt | pad]`), so the prompt
    pass has no left padding and its positions are those of the unshared pass. The completions
    then see keys `[prompt | pad | completion]`; the pad keys are masked and the completions'
    positions continue from each prompt's own length, so every real token has the position and
    causal context it has in `forward_responses`.

    The same fields, from the same distribution `softmax(logits / temperature)`; where sharing
    does not apply (`can_share_prefix`), it is `forward_responses` itself. Outputs at padded
    response positions are unspecified, as there. In train mode, dropout in a prompt is drawn
    once per group rather than once per row.
    Shape: query (b, p), response (b, r), b a multiple of `num_generations` -> each (b, r).
    """
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r}; give the number of completions per prompt, an "
                         "integer >= 1")
    if not can_share_prefix(policy, num_generations, query_ids, query_mask, response_ids, with_policy):
        return forward_responses(policy, query_ids, query_mask, response_ids, response_mask,
                                 with_reference=with_reference, temperature=temperature, with_policy=with_policy,
                                 with_entropy=with_entropy)
    b, first_rows = query_ids.shape[0], slice(None, None, num_generations)  # a group's prompt is its first row's
    empty = response_ids[first_rows, :0]  # (n, 0): `pack_sequences` of the prompts alone
    prompt_ids, prompt_mask, lengths = pack_sequences(query_ids[first_rows], query_mask[first_rows], empty,
                                                      response_mask[first_rows, :0])  # (n, p), (n, p), (n,)
    logprobs = entropy = ref_logprobs = None
    chunked = policy.chunked_head()
    if with_policy:
        last, tail = _group_pass(policy.lm, prompt_ids, prompt_mask.long(), lengths, response_ids, response_mask,
                                 num_generations, chunked)
        logprobs, entropy = _label_logprobs(last, tail, policy.lm.get_output_embeddings() if chunked else None,
                                            response_ids, num_generations, temperature, with_entropy)
    if with_reference:
        with torch.no_grad(), policy.reference() as ref:
            last, tail = _group_pass(ref, prompt_ids, prompt_mask.long(), lengths, response_ids, response_mask,
                                     num_generations, chunked)
            ref_logprobs, _ = _label_logprobs(last, tail, ref.get_output_embeddings() if chunked else None,
                                              response_ids, num_generations, temperature)
    assert all(x is None or x.shape == (b, response_ids.shape[1]) for x in (logprobs, ref_logprobs, entropy))
    return ResponseOutputs(logprobs, None, ref_logprobs, entropy)


def _group_pass(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, lengths: torch.Tensor,
                response_ids: torch.Tensor, response_mask: torch.Tensor, num_generations: int,
                chunked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One causal LM (the policy, or the reference) over the prompts once and the completions on
    their repeated cache. Returns the logits at each prompt's last token, which predict the first
    response token, and the completions' logits, which predict the rest (None for r = 1: the
    last response token predicts nothing scored, so it is not run); with `chunked`, the
    completions' last hidden states instead, for the head to run a chunk at a time.

    Shape: prompts (n, p) packed left, lengths (n,), response (b, r) -> (n, v), (b, r - 1, v or h).
    """
    first = int(lengths.min()) - 1
    keep = torch.arange(first, int(lengths.max()), device=lengths.device)  # the LM head runs here only
    cache, out = repeated_prompt_cache(model, prompt_ids, prompt_mask, num_generations, logits_to_keep=keep)
    index = (lengths - 1 - first)[:, None, None].expand(-1, 1, out.logits.shape[-1])  # (n, 1, v)
    last = out.logits.gather(1, index).squeeze(1)  # (n, v)
    if response_ids.shape[1] == 1:
        return last, None
    ids, mask = response_ids[:, :-1], response_mask[:, :-1].long()  # (b, r - 1)
    # positions continue each prompt's count; pads repeat the last real one, as `position_ids_from_mask`
    positions = lengths.repeat_interleave(num_generations)[:, None] + position_ids_from_mask(mask)  # (b, r - 1)
    keys_mask = torch.cat([prompt_mask.repeat_interleave(num_generations, 0), mask], 1)  # (b, p + r - 1)
    if chunked:
        return last, last_hidden_state(model, ids, keys_mask, positions, past_key_values=cache, use_cache=True)
    tail = model(input_ids=ids, attention_mask=keys_mask, position_ids=positions, past_key_values=cache,
                 use_cache=True).logits  # (b, r - 1, v)
    return last, tail


def _label_logprobs(last: torch.Tensor, tail: torch.Tensor | None, head, response_ids: torch.Tensor,
                    num_generations: int, temperature: float,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens: the first from its prompt's last logits (one row per
    group, repeated for its G labels), the rest from the completions' logits, or from their
    hidden states through `head` when it is given (`label_logprobs`); with `with_entropy`, the
    entropy at each of those positions too (else None).

    Shape: last (n, v), tail (b, r - 1, v or h) or None, response_ids (b, r) -> (b, r), (b, r).
    """
    n, v = last.shape
    firsts = response_ids[:, 0].reshape(n, num_generations)  # (n, G)
    first = logprobs_of_labels(last[:, None].expand(n, num_generations, v), firsts,
                               temperature).reshape(-1, 1)  # (b, 1)
    first_entropy = token_entropy(last[:, None], temperature).repeat_interleave(num_generations, 0) if with_entropy \
        else None  # (b, 1)
    if tail is None:
        return first, first_entropy
    logprobs, entropy = label_logprobs(head, tail, response_ids[:, 1:], temperature, with_entropy)
    return torch.cat([first, logprobs], 1), torch.cat([first_entropy, entropy], 1) if with_entropy else None
