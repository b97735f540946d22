"""The pass over a batch of sampled responses: prompt and response packed side by side, and the
policy's (and the reference's) per-token outputs on the response tokens.

Notation: `b` batch, `p` prompt length, `r` response length, `v` vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlora.algo import logprobs_and_entropy, logprobs_of_labels


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
    the token was sampled from), as trlx. Shape: query (b, p), response (b, r) -> each (b, r).
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
    out = logprobs = values = entropy = ref_logprobs = None
    if with_policy:
        out = policy(input_ids, attention_mask, logits_to_keep=keep)
        if with_entropy:
            logprobs, entropy = (at(x, before - first) for x in logprobs_and_entropy(out.logits, labels, temperature))
        else:
            logprobs = at(logprobs_of_labels(out.logits, labels, temperature), before - first)
        values = None if out.values is None else at(out.values, before)
    if with_reference:
        ref_logits = policy.reference_logits(input_ids, attention_mask, policy_output=out, logits_to_keep=keep)
        ref_logprobs = at(logprobs_of_labels(ref_logits, labels, temperature), before - first)
    return ResponseOutputs(logprobs, values, ref_logprobs, entropy)
