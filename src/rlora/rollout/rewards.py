"""The user's reward functions: one or several, weighted, in rlora's (trlx's) or TRL's convention.

Two calling conventions, told apart by the parameters a function names:
- rlora's (trlx's), for a function naming `samples`, `outputs` or `tokenizer`:
  `fn(samples=..., prompts=..., outputs=..., tokenizer=..., **metadata)`, `samples` being prompt
  text + output; `completion_ids` (the sampled token ids) as well when it names that parameter.
- TRL's (`GRPOTrainer`, 1.16), for every other function: `fn(prompts=..., completions=...,
  completion_ids=..., trainer_state=..., log_extra=..., log_metric=..., **columns)`, every
  metadata key (dataset column) a keyword. `completions` are the output texts, or for chat
  prompts `[{"role": "assistant", "content": text}]` per sample. A function that names neither
  form's own parameters (at most `prompts` and columns) and takes `**kwargs` gets rlora's
  `samples`, `outputs` and `tokenizer` too, so a trlx-era `fn(**kwargs)` keeps working.
Prompts reach both exactly as given: text, or chat messages. A function without `**kwargs` gets
only the keywords it names (TRL would fail it on the first keyword it does not take).

A function may be `async def` (or return an awaitable): those of one call are awaited together
on a background event loop, as TRL does, so they overlap and run whether or not the caller is
itself inside an event loop (a notebook).

With several functions the reward is `Σ_k w_k r_k` (weights `task.reward_weights`, default 1
each). Scores may be numbers or bools (1 and 0). A function may return None for a sample it does
not judge; it counts 0 in the sum (as TRL's nansum), and a sample no function judges trains on 0
with a warning (as TRL warns). Per-token rewards (a list per sample) need a single reward
function; a list may hold one score per sampled token or, as trlx's dense example, one per token
of `tokenizer(output)`, which are placed on the sampled tokens by character.

Notation: `b` samples, `r` response length.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlora.rollout.scoring import collate_metadata, place_by_character, validate_scores

RLORA_PARAMETERS = frozenset({"samples", "outputs", "tokenizer"})
TRL_PARAMETERS = frozenset({"completions", "completion_ids", "trainer_state", "log_extra", "log_metric"})


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


def calling_convention(fn: Callable, name: str = "reward_fn") -> str:
    """How `fn` is called: "rlora" (it names `samples`, `outputs` or `tokenizer`), "trl" (it names
    `completions`, `completion_ids`, `trainer_state`, `log_extra` or `log_metric`, or takes no
    `**kwargs`), or "both" (it names neither form's own parameters and takes `**kwargs`: it gets
    every keyword of both). A function without a readable signature (a builtin) gets rlora's."""
    parameters = _parameters(fn)
    if parameters is None:
        return "rlora"
    named, takes_kwargs = parameters
    rlora, trl = sorted(named & RLORA_PARAMETERS), sorted(named & TRL_PARAMETERS - {"completion_ids"})
    if rlora and trl:
        raise TypeError(f"reward function {name!r} names {', '.join(rlora)} (rlora's and trlx's form) and "
                        f"{', '.join(trl)} (TRL's); name the parameters of one form")
    if rlora:
        return "rlora"
    if named & TRL_PARAMETERS or not takes_kwargs:
        return "trl"
    return "both"


def function_name(fn: Callable, index: int) -> str:
    return getattr(fn, "__name__", None) or getattr(type(fn), "__name__", None) or f"reward_{index}"


class RewardFunctions:
    """One or several reward functions with their weights; calling it scores a `ScoreBatch`.

    What TRL-style functions log through `log_metric(name, value)` and `log_extra(column, values)`
    is kept until `drain_logs()` hands it over.
    """

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
        self.conventions = [calling_convention(fn, name) for fn, name in zip(self.functions, self.names)]
        self.parameters = [_parameters(fn) or (frozenset(), True) for fn in self.functions]
        self.metrics: dict[str, list[float]] = {}
        self.columns: dict[str, list] = {}

    def __call__(self, batch: ScoreBatch, tokenizer, trainer_state=None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward and each function's own values (NaN where it returned None).

        `trainer_state` (a `transformers.TrainerState`) reaches TRL-style functions; None gives
        them a fresh one at step 0.
        Shape: -> (b,) or, from a single function returning per-token lists, (b, max length);
        per function (b,).
        """
        lengths = batch.lengths
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch))
        unjudged_by_all = torch.ones(len(batch), dtype=torch.bool)
        for name, weight, raw in zip(self.names, self.weights, self._call_all(batch, tokenizer, trainer_state)):
            what = self._what(name)
            place = lambda i, row, what=what: place_by_character(  # noqa: E731  trlx's form: over tokenizer(output)
                row, batch.completion_ids[i], batch.outputs[i], tokenizer, i, what)
            scores = validate_scores(_without_none(raw), lengths, what=what, place=place)
            if scores.dim() == 2:
                if len(self.functions) > 1:
                    raise ValueError(f"{what} returned per-token scores; per-token rewards need a single reward "
                                     "function: return one number (or None) per sample from each of several")
                return scores * weight, {name: scores.sum(1)}
            unjudged = torch.tensor([x is None for x in _as_list(raw)], dtype=torch.bool)
            unjudged_by_all &= unjudged
            values[name] = scores.masked_fill(unjudged, math.nan)
            total += weight * scores  # an unjudged sample counts 0
        if unjudged_by_all.any():
            self._warn_unjudged(batch, unjudged_by_all)
        return total, values

    def drain_logs(self) -> tuple[dict[str, float], dict[str, list]]:
        """What the functions logged since the last drain: each `log_metric` name's mean value and
        each `log_extra` column's values (one per sample scored); emptied."""
        metrics = {name: sum(v) / len(v) for name, v in self.metrics.items() if v}
        columns, self.metrics, self.columns = self.columns, {}, {}
        return metrics, columns

    def _what(self, name: str) -> str:
        return "reward_fn" if len(self.functions) == 1 else f"reward function {name!r}"

    def _call_all(self, batch: ScoreBatch, tokenizer, trainer_state) -> list[Any]:
        """Each function's raw return, in order; the awaitables (async functions) awaited together."""
        if trainer_state is None and any(c != "rlora" for c in self.conventions):
            from transformers import TrainerState

            trainer_state = TrainerState()  # global_step 0
        results: list[Any] = []
        pending: dict[int, Any] = {}
        try:
            for i, fn in enumerate(self.functions):
                keywords = self._keywords(i, batch, tokenizer, trainer_state)
                try:
                    results.append(fn(**keywords))
                except Exception as err:
                    raise _raised(self._what(self.names[i]), err, batch) from err
                if inspect.isawaitable(results[-1]):
                    pending[i] = results[-1]
        except BaseException:
            for awaitable in pending.values():
                getattr(awaitable, "close", lambda: None)()  # no "coroutine was never awaited"
            raise
        if pending:
            done = asyncio.run_coroutine_threadsafe(_gather(list(pending.values())), _background_loop()).result()
            for i, outcome in zip(pending, done):
                if isinstance(outcome, BaseException):
                    raise _raised(self._what(self.names[i]), outcome, batch) from outcome
                results[i] = outcome
        return results

    def _keywords(self, i: int, batch: ScoreBatch, tokenizer, trainer_state) -> dict[str, Any]:
        """The keyword arguments of function i in its convention (module docstring)."""
        columns = collate_metadata(batch.metadata)
        rlora = {"samples": [p + o for p, o in zip(batch.prompt_texts, batch.outputs)], "prompts": batch.prompts,
                 "outputs": batch.outputs, "tokenizer": tokenizer}
        named, takes_kwargs = self.parameters[i]
        if self.conventions[i] == "rlora":
            own = {**rlora, **({"completion_ids": batch.completion_ids} if "completion_ids" in named else {})}
            extra = {}
        else:
            completions = [[{"role": "assistant", "content": o}] if not isinstance(p, str) else o
                           for p, o in zip(batch.prompts, batch.outputs)]
            own = {"prompts": batch.prompts, "completions": completions, "completion_ids": batch.completion_ids,
                   "trainer_state": trainer_state, "log_extra": self._log_extra, "log_metric": self._log_metric}
            columns = {k: v for k, v in columns.items() if k not in ("completion", "completion_ids")}  # as TRL
            extra = {k: v for k, v in rlora.items() if k not in own and k not in columns} \
                if self.conventions[i] == "both" else {}
        clash = sorted(set(own) & set(columns))
        if clash:
            raise ValueError(f"prompt metadata {', '.join(map(repr, clash))} has the name of an argument that "
                             f"{self._what(self.names[i])} receives; rename that key (dataset column)")
        keywords = {**own, **extra, **columns}
        return keywords if takes_kwargs else {k: v for k, v in keywords.items() if k in named}

    def _log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self.columns.setdefault(column, []).extend(values)

    def _warn_unjudged(self, batch: ScoreBatch, unjudged: torch.Tensor) -> None:
        first = int(unjudged.nonzero()[0])
        who = "reward_fn" if len(self.functions) == 1 else f"every reward function ({', '.join(self.names)})"
        warnings.warn(f"{who} returned None for {int(unjudged.sum())} of {len(batch)} samples (the first: sample "
                      f"{first}, output {batch.outputs[first][:60]!r}); they train on reward 0. Return a number for "
                      "each sample from at least one reward function", stacklevel=3)


def _parameters(fn: Callable) -> tuple[frozenset[str], bool] | None:
    """The keyword parameters `fn` names and whether it takes `**kwargs`; None without a signature."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return (frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
            any(p.kind == p.VAR_KEYWORD for p in parameters))


def _raised(what: str, err: BaseException, batch: ScoreBatch) -> RuntimeError:
    shown = ", ".join(repr(o[:40]) for o in batch.outputs[:3])
    return RuntimeError(f"{what} raised {type(err).__name__}: {err} while scoring a batch of {len(batch)} "
                        f"samples (first outputs: {shown}); fix it for these inputs")


async def _gather(awaitables: list) -> list:
    return await asyncio.gather(*awaitables, return_exceptions=True)


_loop: tuple[int, asyncio.AbstractEventLoop] | None = None  # (the process id, its loop)
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for async reward functions, on a daemon thread started at the
    first use (as TRL's). One loop for the whole run: a client an async function opened on it
    (an HTTP session) stays usable from one batch to the next. A forked child, which has the
    loop but not its thread, starts its own."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop[0] != os.getpid() or _loop[1].is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rlora-reward-loop", daemon=True).start()
            _loop = (os.getpid(), loop)
        return _loop[1]


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
