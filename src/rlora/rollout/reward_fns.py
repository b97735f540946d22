"""The user's reward functions: one or several, weighted, in rlora's (trlx's) or TRL's convention.

Two calling conventions, told apart by the function's parameters:
- TRL's `GRPOTrainer` convention, for a function with a `completions` parameter:
  `fn(prompts=..., completions=..., completion_ids=..., **columns)`. `completions` are the
  output texts, or for chat prompts `[{"role": "assistant", "content": text}]` per sample;
  `completion_ids` the sampled token ids; every metadata key (dataset column) is a keyword.
- rlora's (trlx's) for every other function: `fn(samples=..., prompts=..., outputs=...,
  tokenizer=..., **metadata)`, `samples` being prompt text + output.
Prompts reach both exactly as given: text, or chat messages.

With several functions the reward is `Σ_k w_k r_k` (weights `task.reward_weights`, default 1
each). A function may return None for a sample it does not judge; it counts 0 in the sum (as
TRL's nansum). Per-token rewards (a list per sample) need a single reward function.

Notation: `b` samples, `r` response length.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlora.rollout.scoring import collate_metadata, validate_scores


@dataclass
class ScoreBatch:
    """What reward functions see of some samples; plain data, so processes can gather it."""

    prompts: list  # as the user gave them: text or chat messages
    prompt_texts: list[str]  # what each prompt stands for (chat messages rendered)
    outputs: list[str]
    completion_ids: list[list[int]]  # the real response tokens (a generated EOS included)
    metadata: list[dict[str, Any]]

    @classmethod
    def of(cls, rollouts, metadata: list[dict[str, Any]]) -> "ScoreBatch":
        ids = [row[mask].tolist() for row, mask in zip(rollouts.response_ids, rollouts.response_mask)]
        return cls(list(rollouts.prompts), list(rollouts.prompt_texts), list(rollouts.outputs), ids, list(metadata))

    @classmethod
    def concat(cls, parts: Sequence["ScoreBatch"]) -> "ScoreBatch":
        return cls(*([x for part in parts for x in getattr(part, name)] for name in
                     ("prompts", "prompt_texts", "outputs", "completion_ids", "metadata")))

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, part: slice) -> "ScoreBatch":
        return ScoreBatch(self.prompts[part], self.prompt_texts[part], self.outputs[part], self.completion_ids[part],
                          self.metadata[part])

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.completion_ids]


def is_trl_style(fn: Callable) -> bool:
    """True for a reward function written for TRL's `GRPOTrainer`: it has a `completions` parameter."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): rlora's convention
        return False


def function_name(fn: Callable, index: int) -> str:
    return getattr(fn, "__name__", None) or getattr(type(fn), "__name__", None) or f"reward_{index}"


class RewardFunctions:
    """One or several reward functions with their weights; calling it scores a `ScoreBatch`."""

    def __init__(self, functions: Callable | Sequence[Callable], weights: Sequence[float] | None = None):
        self.functions = list(functions) if isinstance(functions, (list, tuple)) else [functions]
        for i, fn in enumerate(self.functions):
            if not callable(fn):
                raise TypeError(f"reward_fn[{i}] is a {type(fn).__name__}, not a function; give callables")
        names = [function_name(fn, i) for i, fn in enumerate(self.functions)]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        if weights is not None and len(weights) != len(self.functions):
            raise ValueError(f"task.reward_weights has {len(weights)} weights for {len(self.functions)} reward "
                             f"functions ({', '.join(self.names)}); give one weight per function")
        self.weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        self.trl_style = [is_trl_style(fn) for fn in self.functions]

    def __call__(self, batch: ScoreBatch, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward and each function's own values (NaN where it returned None).

        Shape: -> (b,) or, from a single function returning per-token lists, (b, max length);
        per function (b,).
        """
        lengths = batch.lengths
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch))
        for fn, name, weight, trl_style in zip(self.functions, self.names, self.weights, self.trl_style):
            what = "reward_fn" if len(self.functions) == 1 else f"reward function {name!r}"
            raw = self._call(fn, trl_style, batch, tokenizer, what)
            judged = _without_none(raw)
            scores = validate_scores(judged, lengths, what=what)
            if scores.dim() == 2:
                if len(self.functions) > 1:
                    raise ValueError(f"{what} returned per-token scores; per-token rewards need a single reward "
                                     "function: return one number (or None) per sample from each of several")
                return scores * weight, {name: scores.sum(1)}
            unjudged = torch.tensor([x is None for x in _as_list(raw)], dtype=torch.bool)
            values[name] = scores.masked_fill(unjudged, math.nan)
            total += weight * scores  # an unjudged sample counts 0
        return total, values

    @staticmethod
    def _call(fn: Callable, trl_style: bool, batch: ScoreBatch, tokenizer, what: str) -> Any:
        try:
            if trl_style:
                completions = [[{"role": "assistant", "content": o}] if not isinstance(p, str) else o
                               for p, o in zip(batch.prompts, batch.outputs)]
                return fn(prompts=batch.prompts, completions=completions, completion_ids=batch.completion_ids,
                          **collate_metadata(batch.metadata))
            samples = [p + o for p, o in zip(batch.prompt_texts, batch.outputs)]
            return fn(samples=samples, prompts=batch.prompts, outputs=batch.outputs, tokenizer=tokenizer,
                      **collate_metadata(batch.metadata))
        except Exception as err:
            shown = ", ".join(repr(o[:40]) for o in batch.outputs[:3])
            raise RuntimeError(f"{what} raised {type(err).__name__}: {err} while scoring a batch of {len(batch)} "
                               f"samples (first outputs: {shown}); fix it for these inputs") from err


def _as_list(scores: Any) -> Any:
    if isinstance(scores, torch.Tensor):
        return scores.detach().cpu().tolist()
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        return scores.tolist()
    return scores


def _without_none(scores: Any) -> Any:
    """`scores` with each None (a sample the function does not judge) as 0.0."""
    scores = _as_list(scores)
    if isinstance(scores, (list, tuple)) and any(s is None for s in scores):
        return [0.0 if s is None else s for s in scores]
    return scores
