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
not judge; it counts 0 in the sum (as TRL's nansum), and a sample no function judges has reward
NaN, with a warning (as TRL warns): the group methods leave it out of its group's statistics and
give it advantage 0, as TRL does; PPO trains it on 0. Per-token rewards (a list per sample) need a single reward
function; a list may hold one score per sampled token or, as trlx's dense example, one per token
of `tokenizer(output)`, which are placed on the sampled tokens by character.

Their scores are checked here too (`validate_scores`: one per sample, finite numbers, errors
naming the sample and value), placed on the sampled tokens (`place_by_character`), added to the
reward adapter's (`add_scores`) and joined across chunks (`concat_scores`).

Notation: `b` samples, `r` response length.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import math
import numbers
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

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
    # multi-turn episodes: the messages after each opening (TRL's completions), and the environments
    completions: list | None = None
    environments: list | None = None

    @classmethod
    def of(cls, rollouts, metadata: list[dict[str, Any]]) -> "ScoreBatch":
        ids = [row[mask].tolist() for row, mask in zip(rollouts.response_ids, rollouts.response_mask)]
        episodes = rollouts.episodes
        return cls(list(rollouts.prompts), list(rollouts.prompt_texts), list(rollouts.outputs), ids, list(metadata),
                   None if episodes is None else [e.completion for e in episodes],
                   None if episodes is None else [e.environment for e in episodes])

    @classmethod
    def concat(cls, parts: Sequence["ScoreBatch"]) -> "ScoreBatch":
        lists = [[x for part in parts for x in getattr(part, name)] for name in
                 ("prompts", "prompt_texts", "outputs", "completion_ids", "metadata")]
        optional = [None if any(getattr(part, name) is None for part in parts) else
                    [x for part in parts for x in getattr(part, name)] for name in ("completions", "environments")]
        return cls(*lists, *optional)

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, part: slice) -> "ScoreBatch":
        return ScoreBatch(self.prompts[part], self.prompt_texts[part], self.outputs[part], self.completion_ids[part],
                          self.metadata[part], None if self.completions is None else self.completions[part],
                          None if self.environments is None else self.environments[part])

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


def check_reward_given(reward_fn: Any, has_reward_adapter: bool, has_environment: bool = False) -> None:
    """Refuse a run with nothing to reward it: neither a reward function, a reward adapter nor an
    environment (whose `get_reward` may give one)."""
    if reward_fn is None and not has_reward_adapter and not has_environment:
        raise ValueError("no reward: pass reward_fn=fn(samples, prompts, outputs, tokenizer, **metadata) (or TRL's "
                         "fn(prompts, completions, **kwargs)), set task.reward_fn to 'module:function', or set "
                         "model.reward_adapter to a reward adapter trained with `rlora rm`")


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
            total += weight * scores  # a sample this function did not judge counts 0
        if unjudged_by_all.any():
            self._warn_unjudged(batch, unjudged_by_all)
            total = total.masked_fill(unjudged_by_all, math.nan)  # judged by none: no reward at all (TRL)
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
        episodes = {} if batch.environments is None else {"environments": batch.environments}
        if self.conventions[i] == "rlora":
            own = {**rlora, **({"completion_ids": batch.completion_ids} if "completion_ids" in named else {}),
                   **episodes}
            extra = {}
        else:
            completions = batch.completions if batch.completions is not None else \
                [[{"role": "assistant", "content": o}] if not isinstance(p, str) else o
                 for p, o in zip(batch.prompts, batch.outputs)]
            own = {"prompts": batch.prompts, "completions": completions, "completion_ids": batch.completion_ids,
                   "trainer_state": trainer_state, "log_extra": self._log_extra, "log_metric": self._log_metric,
                   **episodes}
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
                      f"{first}, output {batch.outputs[first][:60]!r}); they have no reward (the group methods give "
                      "them advantage 0, PPO reward 0). Return a number for each sample from at least one reward "
                      "function", stacklevel=3)


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
    if fn_scores.dim() == 1:  # a sample no function judged has the adapter's score alone
        return torch.nan_to_num(fn_scores, nan=0.0) + adapter_scores
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
