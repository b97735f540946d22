"""Generation: sample responses for a chunk of prompts and cut them into real tokens and padding.

Notation: `b` batch, `p` prompt length (left-padded), `r` response length (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


@dataclass
class Rollouts:
    """Prompts and sampled responses of one chunk, as tensors and as text."""

    query_ids: torch.Tensor  # (b, p) left-padded
    query_mask: torch.Tensor  # (b, p) bool, True on prompt tokens
    response_ids: torch.Tensor  # (b, r) right-padded
    response_mask: torch.Tensor  # (b, r) bool, True on real response tokens (EOS included)
    prompts: list[str]
    outputs: list[str]

    @property
    def samples(self) -> list[str]:
        return [p + o for p, o in zip(self.prompts, self.outputs)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: n lists -> ids (n, longest), mask (n, longest) bool, content at the right."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, length - len(s):] = True
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: n lists -> ids (n, longest), mask (n, longest) bool, content at the left."""
    length = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (all of them when none was generated)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def apply_stop_sequences(output: str, stop_sequences: Sequence[str]) -> str | None:
    """The output cut before the first stop string, or None when none occurs."""
    cuts = [i for i in (output.find(s) for s in stop_sequences if s) if i >= 0]
    return output[: min(cuts)] if cuts else None


@torch.no_grad()
def generate_rollouts(policy, tokenizer, prompt_ids: list[list[int]], gen_kwargs: dict,
                      stop_sequences: Sequence[str] = (), merged: bool = False) -> Rollouts:
    """Sample one response per prompt with the policy (adapters on, dropout as set by the caller).

    A response is its tokens up to and including the first EOS. With `stop_sequences`, an
    output holding a stop string is cut before it, re-encoded and given an EOS (as trlx does);
    the scoring pass then scores exactly those tokens.
    """
    device = next(policy.parameters()).device
    query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **gen_kwargs}
    if not kwargs.get("do_sample", False):  # greedy or beam search: sampling settings do not apply
        kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLING_ONLY}
    if merged:
        kwargs["merged"] = True
    sequences = policy.generate(query_ids, query_mask.long(), **kwargs)
    generated = sequences[:, query_ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    responses = [cut_at_eos(tokens, eos) for tokens in generated]
    prompts = tokenizer.batch_decode([ids for ids in prompt_ids], skip_special_tokens=True)
    outputs = tokenizer.batch_decode(responses, skip_special_tokens=True)
    if stop_sequences:
        for i, output in enumerate(outputs):
            cut = apply_stop_sequences(output, stop_sequences)
            if cut is not None:
                outputs[i] = cut
                responses[i] = tokenizer(cut, add_special_tokens=False).input_ids + [eos]
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    return Rollouts(query_ids.cpu(), query_mask.cpu(), response_ids, response_mask, prompts, outputs)
