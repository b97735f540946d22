"""Prompts: normalisation, tokenisation with truncation, and a resumable shuffled loader."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the metadata passed with it to `reward_fn` / `metric_fn`."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def normalize_prompts(prompts: Sequence[str | dict], what: str = "prompts") -> list[Prompt]:
    """Accept strings or dicts with a "prompt" key (other keys are metadata)."""
    if isinstance(prompts, (str, dict)) or prompts is None:
        raise TypeError(f"{what} must be a list of strings or dicts, got {type(prompts).__name__}; "
                        f"wrap a single prompt in a list")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(Prompt(p))
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            out.append(Prompt(p["prompt"], {k: v for k, v in p.items() if k != "prompt"}))
        else:
            raise TypeError(f"{what}[{i}] = {p!r:.80} is neither a string nor a dict with a 'prompt' string; "
                            "give each prompt as text or as {'prompt': text, **metadata}")
    if not out:
        raise ValueError(f"{what} is empty; give at least one prompt")
    keys = set(out[0].metadata)
    for i, p in enumerate(out):
        if set(p.metadata) != keys:
            raise ValueError(f"{what}[{i}] has metadata keys {sorted(p.metadata)} but {what}[0] has {sorted(keys)}; "
                             "give every prompt the same metadata keys")
    return out


def _encode_parts(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[tuple[list[int], list[int]]]:
    """(leading special tokens, text tokens) of each text. The leading tokens are those the
    tokenizer itself puts in front (a BOS for Llama / Mistral, none for GPT-2); one it would
    append (an EOS) is dropped, since a response or an EOS of rlora's follows."""
    plain = tokenizer(list(texts), add_special_tokens=False).input_ids
    if not add_special_tokens:
        return [([], p) for p in plain]
    out = []
    for full, p in zip(tokenizer(list(texts), add_special_tokens=True).input_ids, plain):
        if full and full[-1] == tokenizer.eos_token_id and full[-1 - len(p):-1] == p and len(full) > len(p):
            full = full[:-1]  # an EOS the tokenizer appended
        n_lead = len(full) - len(p)
        out.append((full[:n_lead], p) if full[n_lead:] == p else ([], full))
    return out


def encode(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, opened by the tokenizer's own special tokens when
    `add_special_tokens` (see `_encode_parts`); never ending in an EOS the tokenizer appended."""
    return [lead + ids for lead, ids in _encode_parts(tokenizer, texts, add_special_tokens)]


def tokenize_prompts(prompts: list[Prompt], tokenizer, max_length: int, what: str = "prompts",
                     add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt (`encode`), truncated to `max_length` from the tokenizer's
    truncation side; leading special tokens (a BOS) are kept either way.

    Truncation is warned about once per call, naming how many prompts were cut.
    """
    parts = _encode_parts(tokenizer, [p.text for p in prompts], add_special_tokens)
    ids = [lead + x for lead, x in parts]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} of {len(ids)} {what} are longer than {max_length} tokens (train.seq_length minus "
            f"max_new_tokens), e.g. {what}[{too_long[0]}] has {len(ids[too_long[0]])}; they are truncated from the "
            f"{tokenizer.truncation_side}. Raise train.seq_length or shorten the prompts.", stacklevel=3)
        keep_left = tokenizer.truncation_side == "right"
        for i in too_long:
            lead, x = parts[i]
            room = max(0, max_length - len(lead))
            ids[i] = (lead + x)[:max_length] if keep_left else lead[:max_length] + (x[len(x) - room:] if room else [])
    empty = [i for i, (lead, x) in enumerate(parts) if not x]
    if empty:
        raise ValueError(f"{what}[{empty[0]}] is empty after tokenisation; every prompt needs at least one token")
    return ids


class PromptLoader:
    """Endless chunks of prompt indices: a fresh seeded permutation each pass over the prompts.

    Its position (`state_dict`) is two integers, so a resumed run draws the same prompts.
    """

    def __init__(self, n_prompts: int, seed: int):
        self.n_prompts, self.seed = n_prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_prompts, generator=generator).tolist()

    def next_chunk(self, size: int) -> list[int]:
        """The next `size` indices, wrapping into a new permutation when one runs out."""
        chunk: list[int] = []
        while len(chunk) < size:
            if self.position == self.n_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(size - len(chunk), self.n_prompts - self.position)
            chunk += self._order[self.position:self.position + take]
            self.position += take
        return chunk

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
