"""Generation: sample responses for a chunk of prompts and cut them into real tokens and padding.

Notation: `b` batch, `p` prompt length (left-padded), `r` response length (right-padded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
# Sampling with no logits processor at all: `gen_kwargs` set everything else. Unset, transformers
# would fill these from the checkpoint's generation_config (or its own top_k=50).
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
# `generate` arguments that are not generation settings; passed beside the GenerationConfig.
GENERATE_ARGUMENTS = ("synced_gpus", "streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                      "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "tokenizer")


@dataclass
class Rollouts:
    """Prompts and sampled responses of one chunk, as tensors and as text."""

    query_ids: torch.Tensor  # (b, p) left-padded
    query_mask: torch.Tensor  # (b, p) bool, True on prompt tokens
    response_ids: torch.Tensor  # (b, r) right-padded
    response_mask: torch.Tensor  # (b, r) bool, True on real response tokens (EOS included)
    prompts: list  # each exactly as the user gave it: text or chat messages
    outputs: list[str]
    prompt_texts: list[str]  # the text each prompt stands for (chat messages rendered by the template)
    truncated: torch.Tensor  # (b,) bool, True where the response reached max_new_tokens without a stop
    # (b, r) bool, True on the tokens the model sampled; in a multi-turn episode the environment's
    # and the tools' tokens between its turns are real response tokens but not the model's (False)
    action_mask: torch.Tensor | None = None
    episodes: list | None = None  # multi-turn episodes: each sample's `rlora.rollout.episodes.Episode`

    def __post_init__(self):
        if self.action_mask is None:  # single-turn: every real response token is the model's
            self.action_mask = self.response_mask.clone()

    @property
    def samples(self) -> list[str]:
        """Prompt text + output of each sample."""
        return [p + o for p, o in zip(self.prompt_texts, self.outputs)]


def stop_token_ids(gen_kwargs: dict, tokenizer, model_generation_config=None) -> list[int]:
    """The token ids that end a response: `gen_kwargs["eos_token_id"]` (an id or a list) when
    set, else the tokenizer's EOS followed by any other EOS ids of the model's own
    `generation_config` (Llama-3 style end-of-turn tokens). The first is the one appended to a
    response cut at a stop sequence."""
    given = gen_kwargs.get("eos_token_id")
    if given is None:
        model_ids = getattr(model_generation_config, "eos_token_id", None)
        given = [tokenizer.eos_token_id, *(model_ids if isinstance(model_ids, (list, tuple)) else [model_ids])]
    ids = [given] if isinstance(given, int) else list(given)
    return list(dict.fromkeys(i for i in ids if i is not None))


def rollout_generation_config(gen_kwargs: dict, tokenizer, stop_ids: list[int]):
    """`gen_kwargs` over neutral defaults as one `GenerationConfig`, plus the `generate`
    arguments that are not settings. Nothing comes from the checkpoint's own generation_config.

    Greedy and beam search drop the sampling-only settings, which would not apply.
    """
    from transformers import GenerationConfig

    settings = {**NEUTRAL_SAMPLING, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                **gen_kwargs, "eos_token_id": stop_ids}
    arguments = {k: settings.pop(k) for k in GENERATE_ARGUMENTS if k in settings}
    if not settings.get("do_sample", False):
        settings = {k: v for k, v in settings.items() if k not in SAMPLING_ONLY}
    if settings.get("stop_strings"):
        arguments.setdefault("tokenizer", tokenizer)  # transformers matches stop strings through it
    return GenerationConfig(**settings), arguments


# Warpers that `DrawToken` applies itself, in transformers' order; with any other sampling setting
# (typical_p, epsilon / eta cutoffs, top_h) `generate` samples on its own.
DRAWN_HERE = ("temperature", "top_k", "top_p", "min_p")


class DrawToken:
    """The last logits processor of a sampling `generate`: it draws each row's next token from
    `softmax(scores)` and returns scores that are -inf everywhere else, so that `generate`'s
    greedy step takes the drawn token.

    The draw is inverse transform sampling: one uniform per row against the row's cumulative
    probabilities (float64). transformers' own draw, `torch.multinomial`, makes an exponential
    variate for every vocabulary entry of every row at every step, a visible share of a decode
    step on a large vocabulary (BENCHMARKS.md, sampling a group chunk). The distribution drawn from is
    the same; the random stream differs. `warpers` (temperature, top-k, top-p, min-p) run first,
    as transformers would run them. Shape: scores (b, v) -> (b, v).
    """

    def __init__(self, warpers: list):
        self.warpers = warpers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        return self.draw(scores)

    @staticmethod
    def draw(scores: torch.Tensor) -> torch.Tensor:
        """One token per row from softmax(scores), as (b, v) scores: 0 there, -inf elsewhere.
        Raises, as `torch.multinomial` does, on a row that is no distribution (nan, +inf, or every
        entry -inf): a diverged policy stops the run instead of sampling its last token id."""
        cdf = scores.softmax(-1).cumsum(-1, dtype=torch.float64)  # (b, v); float64 sums 49k terms exactly enough
        total = cdf[:, -1:]  # (b, 1)
        valid = (total > 0.5) & (total < 1.5)  # a softmax sums to 1; nan fails both tests
        if not bool(valid.all()):
            raise RuntimeError("the sampling distribution holds nan or inf (or masks every token) in "
                               f"{int((~valid).sum())} of {len(total)} rows: the policy's logits are not finite "
                               "(a diverged update: lower the learning rate, clip gradients with "
                               "train.max_grad_norm) or a logits processor removed every token")
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * total  # (b, 1)
        # the first entry whose cumulative probability exceeds u: never one of probability 0
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)  # (b, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def drawn_here(config, arguments: dict):
    """`config` and `arguments` with the token draw done by `DrawToken` (the same distribution,
    faster), or both as they were where `generate` must sample itself: greedy or beam search,
    several sequences per row, a sampling setting other than `DRAWN_HERE` (or `penalty_alpha`),
    or temperature / top_k / top_p set to None (transformers fills them from its own defaults)."""
    from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, \
        TopPLogitsWarper

    other_sampling = ((config.typical_p is not None and config.typical_p < 1.0)
                      or (config.epsilon_cutoff or 0.0) > 0.0 or (config.eta_cutoff or 0.0) > 0.0
                      or getattr(config, "top_h", None) is not None
                      or config.penalty_alpha is not None)  # penalty_alpha: greedy would become contrastive search
    unset = any(getattr(config, k) is None for k in ("temperature", "top_k", "top_p"))  # transformers fills these
    if (not config.do_sample or other_sampling or unset or (config.num_beams or 1) != 1
            or (config.num_return_sequences or 1) != 1 or config.watermarking_config is not None
            or config.renormalize_logits):
        return config, arguments
    warpers = []  # temperature, top_k and top_p are set here (`unset` above)
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    config = copy.deepcopy(config)
    config.do_sample = False
    for k in DRAWN_HERE:
        setattr(config, k, None)
    processors = LogitsProcessorList([*(arguments.get("logits_processor") or []), DrawToken(warpers)])
    return config, {**arguments, "logits_processor": processors}


def sampling_temperature(gen_kwargs: dict) -> float:
    """The temperature the responses are drawn at (1 for greedy / beam search): every pass
    scores `softmax(logits / temperature)`, the distribution that was sampled."""
    return float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample", False) else 1.0


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


def cut_at_eos(tokens: list[int], eos_ids: int | Sequence[int]) -> list[int]:
    """Tokens up to and including the first of the stop ids (all of them when none was generated)."""
    stops = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def _first(n: int, holds) -> int:
    """The smallest k in [0, n] with `holds(k)` (n when none), for `holds` monotone in k."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


def tokens_through_stop_string(tokens: list[int], decode, stop_strings: Sequence[str]) -> list[int]:
    """The tokens up to the one that completes the first stop string (kept: `generate` stops
    after it), or all of them when the text holds none. `decode(ids) -> str`."""
    stop_strings = [s for s in stop_strings if s]
    if not any(s in decode(tokens) for s in stop_strings):
        return tokens
    return tokens[:_first(len(tokens), lambda k: any(s in decode(tokens[:k]) for s in stop_strings))]


def tokens_before_stop_sequence(tokens: list[int], decode, stop_sequences: Sequence[str]) -> list[int] | None:
    """The sampled tokens before the one in which the first stop sequence starts, or None when
    the text holds none. Cutting at a token boundary keeps the scored ids the sampled ids:
    re-encoding the cut text could give other tokens. `decode(ids) -> str`."""
    start = [i for i in (decode(tokens).find(s) for s in stop_sequences if s) if i >= 0]
    if not start:
        return None
    c = min(start)  # the stop sequence's first character; the token holding it is dropped with the rest
    return tokens[:_first(len(tokens), lambda k: len(decode(tokens[:k])) > c) - 1]


def sampling_settings(policy, tokenizer, gen_kwargs: dict):
    """The `GenerationConfig`, the further `generate` arguments and the stop ids that sample
    `gen_kwargs` with `policy` (`rollout_generation_config`, the token draw of `drawn_here`)."""
    base = getattr(policy, "base_model", None)
    stops = stop_token_ids(gen_kwargs, tokenizer, getattr(base, "generation_config", None))
    config, arguments = drawn_here(*rollout_generation_config(gen_kwargs, tokenizer, stops))
    return config, arguments, stops


@torch.no_grad()
def generate_rollouts(policy, tokenizer, prompts: list, prompt_ids: list[list[int]], gen_kwargs: dict,
                      stop_sequences: Sequence[str] = (), merged: bool = False,
                      prompt_texts: list[str] | None = None, num_generations: int = 1,
                      share_prompt: bool = True, dtype: torch.dtype | None = None) -> Rollouts:
    """Sample `num_generations` responses per prompt with the policy (adapters on, dropout as set
    by the caller); the rows of one prompt are contiguous (a group).

    Sampling uses exactly `gen_kwargs` over neutral defaults (`rollout_generation_config`). A
    response is its tokens up to and including the first stop id (`stop_token_ids`), or through
    the first of `gen_kwargs["stop_strings"]`; everything after is padding. With
    `stop_sequences` (trlx's), a response is cut at the token in which the first of them starts
    and given an EOS, so the scored tokens are the sampled ones. `prompts` are kept as given
    (they reach reward_fn); `prompt_texts` are the texts they stand for (default: the prompts
    themselves) and `prompt_ids` their tokens. Outputs are the decoded responses.

    With `share_prompt` (and `num_generations > 1`) the prompts go to `policy.generate` once each,
    with `num_generations`: each prompt runs once and its KV cache serves its whole group, except
    where `rlora.models.shared_prefix.can_share_prefix` says it cannot (prompt or prefix tuning,
    ZeRO-3's `synced_gpus`, beam search, ...), where the policy repeats the rows itself. `share_prompt=False` repeats
    each prompt `num_generations` times here, before generation. `merged` and `dtype` choose the
    weights sampled on (`Policy.generation_weights`).
    """
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}; sample at least one response per prompt "
                         "(num_generations >= 1)")
    device = next(policy.parameters()).device
    shared = share_prompt and num_generations > 1  # the policy expands each prompt to its group
    if num_generations > 1:
        prompts = _repeat(prompts, num_generations)
        prompt_texts = None if prompt_texts is None else _repeat(prompt_texts, num_generations)
        if not shared:
            prompt_ids = _repeat(prompt_ids, num_generations)
    query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    config, arguments, stops = sampling_settings(policy, tokenizer, gen_kwargs)
    if merged:
        arguments["merged"] = True
    if dtype is not None:
        arguments["dtype"] = dtype
    if shared:
        arguments["num_generations"] = num_generations
    sequences = policy.generate(query_ids, query_mask.long(), generation_config=config, **arguments)
    if shared:
        query_ids = query_ids.repeat_interleave(num_generations, 0)  # (b * G, p): the rows of each group
        query_mask = query_mask.repeat_interleave(num_generations, 0)
    responses = [cut_at_eos(tokens, stops) for tokens in sequences[:, query_ids.shape[1]:].tolist()]
    ended = [bool(r) and r[-1] in stops for r in responses]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    if gen_kwargs.get("stop_strings"):
        strings = gen_kwargs["stop_strings"]
        cut = [tokens_through_stop_string(r, decode, [strings] if isinstance(strings, str) else strings)
               for r in responses]
        ended = [e or _holds(decode(c), strings) for e, c in zip(ended, cut)]
        responses = cut
    if stop_sequences:
        for i, response in enumerate(responses):
            kept = tokens_before_stop_sequence(response, decode, stop_sequences)
            if kept is not None:
                responses[i] = kept + [stops[0]]
                ended[i] = True
    outputs = [decode(r) for r in responses]
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    texts = list(prompts) if prompt_texts is None else list(prompt_texts)
    return Rollouts(query_ids.cpu(), query_mask.cpu(), response_ids, response_mask, list(prompts), outputs, texts,
                    truncated=torch.tensor([not e for e in ended], dtype=torch.bool))


def _repeat(items: Sequence, n: int) -> list:
    """Each item `n` times in a row: [a, b] -> [a, a, b, b] for n = 2."""
    return [item for item in items for _ in range(n)]


def _holds(text: str, strings: str | Sequence[str]) -> bool:
    """Whether `text` holds one of the stop strings (then generation stopped there)."""
    return any(s in text for s in ([strings] if isinstance(strings, str) else strings) if s)
