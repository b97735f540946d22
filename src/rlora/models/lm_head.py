"""The language-model head run a chunk of positions at a time, for the log-probs of chosen tokens
without a (b, t, v) logits tensor (docs/design.md §12).

A pass over responses needs two numbers at each response token from a vocabulary-wide row of
logits: the token's log-prob and the entropy (logged). Running the head over every position at
once keeps all b·t·v logits through the backward pass, and backward adds their gradient; with
long completions and a large vocabulary that is most of what a checkpointed update holds.
`label_logprobs` runs the head over at most `HEAD_CHUNK_ELEMENTS` logits at a time instead;
with gradients, each chunk is checkpointed, so backward computes its logits again (one more head
matmul per token) and only the hidden states (b, t, h) and the (b, t) results are kept.

This needs a head applied to the trunk's last hidden state as it is. Most causal LMs do that;
some scale the logits after the head (Gemma 2's soft-capping, Cohere's logit scale) or the
hidden state before it. `head_is_plain` checks a model once by running it, and the passes use
the model's own whole head where it is not plain.

Notation: `b` batch, `t` positions, `h` width of the hidden states, `v` vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlora.algo import logprobs_and_entropy, logprobs_of_labels
from rlora.models.trunk import hidden_width, last_hidden_state

HEAD_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32


@torch.no_grad()
def head_is_plain(model: nn.Module) -> bool:
    """Whether causal LM `model`'s logits are its output embedding (`get_output_embeddings()`)
    applied to its last hidden state and nothing more, where the passes read that state: the
    last of the model's `hidden_states`, and the trunk's own output (`last_hidden_state`).
    Checked bitwise on a few tokens with whichever adapters are active, in eval mode (no dropout)
    and on a forked random stream: the model's modes and the random state are as they were after."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(min(4, output_width(head)), device=device)[None]  # (1, 4)
    mask = torch.ones_like(ids)
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.eval()
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1]
            if hidden.shape[-1] != hidden_width(model):
                return False  # the head reads a projection of it (or another width)
            return torch.equal(head(hidden), out.logits) and torch.equal(last_hidden_state(model, ids, mask), hidden)
    finally:
        for m, training in modes:
            m.training = training


def output_width(head: nn.Module) -> int:
    """The number of logits the head gives per position (its weight's rows; whole under ZeRO-3)."""
    return getattr(head.weight, "ds_shape", head.weight.shape)[0]


def label_logprobs(head: nn.Module | None, x: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-prob of each label under `softmax(logits / temperature)`, and with `with_entropy`
    the entropy there (no gradient; else None), as `rlora.algo.logprobs_and_entropy`.

    `x` is the logits themselves when `head` is None, else the hidden states the head reads; then
    the head runs over `HEAD_CHUNK_ELEMENTS` logits at a time (all at once when they fit in one
    chunk), each chunk checkpointed where gradients are taken.
    Shape: x (b, t, v) or (b, t, h), labels (b, t) -> (b, t), (b, t) or None.
    """
    if head is None:
        return _logprobs(x, labels, temperature, with_entropy)
    b, t, h = x.shape
    rows = max(1, HEAD_CHUNK_ELEMENTS // output_width(head))
    if b * t <= rows:
        return _head_logprobs(head, x, labels, temperature, with_entropy)
    flat, flat_labels = x.reshape(1, b * t, h), labels.reshape(1, b * t)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, b * t, rows):
        chunk = (head, flat[:, start:start + rows], flat_labels[:, start:start + rows], temperature, with_entropy)
        parts.append(checkpoint(_head_logprobs, *chunk, use_reentrant=False) if grad else _head_logprobs(*chunk))
    logprobs = torch.cat([p[0] for p in parts], 1).reshape(b, t)
    return logprobs, torch.cat([p[1] for p in parts], 1).reshape(b, t) if with_entropy else None


def _head_logprobs(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _logprobs(head(hidden), labels, temperature, with_entropy)


def _logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_entropy:
        return logprobs_and_entropy(logits, labels, temperature)
    return logprobs_of_labels(logits, labels, temperature), None
