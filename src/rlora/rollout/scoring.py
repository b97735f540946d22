"""Scores from the user's reward functions, validated and placed on the sampled tokens; and the
policy's per-token view of a batch.

Notation: `b` batch, `p` prompt length, `r` response length, `v` vocabulary.
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
from typing import Any, Callable, NamedTuple

import torch

from rlora.algo import logprobs_and_entropy, logprobs_of_labels


def _bad_number(x: Any) -> bool:
    """Whether `x` is no finite real number. Bools count (as 0 and 1): TRL accepts them."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    elif hasattr(x, "item") and getattr(x, "shape", None) == ():  # numpy scalars, np.bool_ included
        x = x.item()
    return not isinstance(x, numbers.Real) or not math.isfinite(float(x))


def validate_scores(scores: Any, response_lengths: list[int], what: str = "reward_fn",
                    place: Callable[[int, list[float]], list[float]] | None = None) -> torch.Tensor:
    """Scores as a tensor: (b,) for one score per sample, or (b, r) for per-token scores.

    Per-token rows are aligned from the first response token. `place(i, row)` puts a row whose
    length is not sample i's response length on its response tokens (`place_by_character`), or
    raises; without it such a row may be shorter than its response, never longer.
    Raises naming the sample index and value: a wrong count, a non-number (bools count as 0 and
    1), NaN/inf, or a per-token list longer than its response.
    """
    n = len(response_lengths)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().tolist()
    elif hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        scores = scores.tolist()  # numpy arrays
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"{what} returned {type(scores).__name__}; return a list with one score per sample")
    if len(scores) != n:
        raise ValueError(f"{what} returned {len(scores)} scores for {n} samples; return one score per sample")
    dense = any(isinstance(s, (list, tuple)) or (isinstance(s, torch.Tensor) and s.dim() == 1) for s in scores)
    if not dense:
        for i, s in enumerate(scores):
            if _bad_number(s):
                raise ValueError(f"{what} returned {s!r} for sample {i}; every score must be a finite number")
        return torch.tensor([float(s) for s in scores], dtype=torch.float32)
    out = torch.zeros(n, max(response_lengths), dtype=torch.float32)
    for i, row in enumerate(scores):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"{what} returned a list of per-token scores for some samples but {row!r} for "
                             f"sample {i}; return either one number per sample or one list per sample")
        for j, s in enumerate(row):
            if _bad_number(s):
                raise ValueError(f"{what} returned {s!r} at token {j} of sample {i}; scores must be finite numbers")
        row = [float(s) for s in row]
        if len(row) != response_lengths[i] and place is not None:
            row = place(i, row)
        elif len(row) > response_lengths[i]:
            raise ValueError(f"{what} returned {len(row)} per-token scores for sample {i}, whose response has "
                             f"{response_lengths[i]} tokens; give at most one score per response token")
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def character_ends(ids: list[int], text: str, tokenizer) -> list[int]:
    """For each token of `ids`, how many characters of `text` (their decoded text) are complete
    once it is decoded, never decreasing: a token holding the first bytes of a character ends
    where the previous one did, the one with its last byte completes it. Decoded as generation
    decodes (special tokens skipped). Incrementally where that rebuilds `text` exactly, else from
    every decoded prefix (quadratic in the length): also where `text` holds an undecodable byte
    ("\ufffd"), which the incremental pass cannot tell from a character still incomplete."""
    ends = None if "\ufffd" in text else _incremental_ends(ids, text, tokenizer)
    return ends if ends is not None else _prefix_ends(ids, text, tokenizer)


def _incremental_ends(ids: list[int], text: str, tokenizer) -> list[int] | None:
    """`character_ends` as streaming detokenizers compute it (TGI, vLLM): each token adds what
    decoding from the previous token's start adds, once that is no incomplete character ("\ufffd"
    at the end); the context keeps SentencePiece's leading spaces. None unless the pieces join
    to `text`: then decoding is not a concatenation (clean-up of spaces), and prefixes decide."""
    ends, pieces, start, read, before, done = [], [], 0, 0, "", 0

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True)

    for k in range(len(ids)):
        after = decode(ids[start:k + 1])
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before):])
            done += len(pieces[-1])
            start, read = read, k + 1
            before = decode(ids[start:read])
        ends.append(done)
    return ends if "".join(pieces) == text else None


def _prefix_ends(ids: list[int], text: str, tokenizer) -> list[int]:
    """`character_ends` from each prefix `decode(ids[:k + 1])`: its common prefix with `text`."""
    ends, reached = [], 0
    prefixes = tokenizer.batch_decode([ids[:k + 1] for k in range(len(ids))], skip_special_tokens=True)
    for prefix in prefixes:
        common = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
        reached = max(reached, common)
        ends.append(reached)
    return ends


def place_by_character(row: list[float], sampled_ids: list[int], output: str, tokenizer, sample: int = 0,
                       what: str = "reward_fn") -> list[float]:
    """Per-token scores over `tokenizer(output).input_ids` (trlx's dense form: the output
    re-tokenized, whose tokens need not be those sampled) placed on the sampled tokens: each on
    the sampled token that completes the same last character. A special token the tokenizer
    adds before the text (a BOS) scores at the first sampled token, one after it (an EOS) at the
    last, where a terminal score goes. The sum is kept. Character ends come from the tokenizer's
    offsets when it is fast, from decoded prefixes otherwise.

    Shape: row (k,) for the k re-tokenized tokens -> (len(sampled_ids),).
    """
    n, fast = len(sampled_ids), getattr(tokenizer, "is_fast", False)
    enc = None if tokenizer is None else tokenizer(output, return_special_tokens_mask=True,
                                                   **({"return_offsets_mapping": True} if fast else {}))
    if enc is None or len(row) != len(enc["input_ids"]) or n == 0:
        retokenized = "" if enc is None else f" and whose output re-tokenizes to {len(enc['input_ids'])}"
        raise ValueError(f"{what} returned {len(row)} per-token scores for sample {sample}, whose response has {n} "
                         f"sampled tokens{retokenized}; return one score per sampled token (completion_ids) or one "
                         "per token of tokenizer(output).input_ids (trlx's form)")
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    ends = [end for _, end in enc["offset_mapping"]] if fast else character_ends(ids, output, tokenizer)
    sampled_ends = character_ends(sampled_ids, output, tokenizer)
    last_text = max((j for j in range(len(ids)) if not special[j]), default=-1)
    placed, reached = [0.0] * n, 0
    for j, score in enumerate(row):
        if special[j] and j > last_text:
            k = n - 1
        else:
            reached = reached if special[j] else max(reached, ends[j])
            k = min(bisect.bisect_left(sampled_ends, reached), n - 1)  # the first token reaching that character
        placed[k] += score
    return placed


def add_scores(fn_scores: torch.Tensor | None, adapter_scores: torch.Tensor | None,
               lengths: torch.Tensor) -> torch.Tensor:
    """reward_fn's scores plus the reward adapter's, which counts at each response's last real
    token when reward_fn's are per token. Shape: (b,) or (b, r), (b,), lengths (b,) -> as fn_scores."""
    if fn_scores is None or adapter_scores is None:
        return adapter_scores if fn_scores is None else fn_scores
    if fn_scores.dim() == 1:
        return fn_scores + adapter_scores
    rows = torch.arange(len(lengths))
    out = fn_scores.clone()
    out[rows, lengths - 1] += adapter_scores
    return out


def concat_scores(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
    """Scores of all chunks: (n,) when every chunk gave one score per sample, else (n, width).

    Shape: chunks of (b_i,) or (b_i, r_i) -> (n,) or (n, width).
    """
    if all(c.dim() == 1 for c in chunks):
        return torch.cat(chunks)
    if any(c.dim() == 1 for c in chunks):
        raise ValueError("reward_fn returned one score per sample for some batches and per-token lists for others; "
                         "return the same kind every time")
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


def collate_metadata(metadata: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample dicts -> one list per key, aligned with the samples."""
    return {key: [m[key] for m in metadata] for key in (metadata[0] if metadata else {})}


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


class ResponseScores(NamedTuple):
    """What one pass over a batch of responses gives, each (b, r) aligned with `response_ids`."""

    logprobs: torch.Tensor | None  # the policy's; None with `with_policy=False`
    values: torch.Tensor | None  # the value head's; None without one (group methods)
    ref_logprobs: torch.Tensor | None  # the reference's, with `with_reference=True`
    entropy: torch.Tensor | None  # the policy's token entropy (no gradient), with `with_entropy=True`


def forward_responses(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                      response_mask: torch.Tensor, with_reference: bool = False, temperature: float = 1.0,
                      with_policy: bool = True, with_entropy: bool = False) -> ResponseScores:
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
    return ResponseScores(logprobs, values, ref_logprobs, entropy)
