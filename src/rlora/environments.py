"""Environments: what a multi-turn episode's model talks to between its turns (docs/design.md §11).

An environment is any object built by a factory (a class, or a function of no arguments), one
instance per episode:

- `reset(**row)` — the episode's record (its prompt's metadata: the dataset's other columns);
  returns the opening prompt (text: one user message; a list: the messages), or None to open
  with the record's own prompt;
- `step(reply)` — optional; called after every assistant turn (the last included, so the
  environment sees it) with the reply's text; returns what the environment says next (text: a
  user message; dicts: messages with role "user" or "tool"), or None when it has nothing to say;
- `get_reward()` — optional; the episode's reward from the environment's own state, added to
  the reward functions' (their weights apply to them, not to this);
- every other public method is a tool the model may call (TRL's `environment_factory`), beside
  the run's standalone `tools`. Each needs type hints and a Google-style docstring.

Any of them may be `async def`: the calls of one turn are then awaited together. An episode ends
when a turn has nothing after it (no tool call, and `step` returned None), after
`method.max_turns` assistant turns, after `method.max_tool_calling_iterations` turns that called
tools, or when the next message would not fit the token budget (`train.seq_length`).

A dict of factories is TRL's multi-environment form: each record names its environment in its
"environment" column, which `reset` does not receive.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rlora.rollout.prompts import Prompt
from rlora.rollout.rewards import _background_loop, _gather
from rlora.tools import ToolCall, call_tools, parse_tool_calls, tool_schemas, tools_by_name

RESERVED = frozenset({"reset", "step", "get_reward"})  # an environment's methods that are not tools


@dataclass
class Episode:
    """One episode's conversation and how it went; plain data but for its environment instance."""

    messages: list[dict[str, Any]]  # the opening, then each reply and what the environment and tools said
    opening: int  # how many of `messages` open the episode (its prompt)
    environment: Any = None  # the instance (None without an environment factory)
    tools: dict[str, Callable] = field(default_factory=dict, repr=False)
    schemas: list[dict] | None = None  # the tools' JSON schemas, as the chat template renders them (None: no tools)
    turns: int = 0  # assistant turns
    tool_calls: int = 0
    tool_errors: int = 0
    tool_turns: int = 0  # assistant turns whose tool calls ran
    ended_by: str = ""  # "environment", "max_turns", "max_tool_calling_iterations", "budget" or "truncated"
    reward: float = math.nan  # get_reward(), NaN without one

    @property
    def completion(self) -> list[dict[str, Any]]:
        """The messages after the opening: what TRL's reward functions get as a completion."""
        return self.messages[self.opening:]

    def __getstate__(self) -> dict[str, Any]:  # gathered across processes: instances and tools stay here
        return {**self.__dict__, "environment": None, "tools": {}}


class Agent:
    """The environment side of a run's episodes: the factory, the standalone tools and the limits.
    `rlora.rollout.episodes` runs the model's side."""

    def __init__(self, environment: Callable | dict[str, Callable] | None = None,
                 tools: Sequence[Callable] = (), max_turns: int = 1,
                 max_tool_calling_iterations: int | None = None, convention: str = "rlora"):
        if environment is None and not tools:
            raise ValueError("an agent needs an environment factory or tools; pass environment=... or tools=[...]")
        factories = environment if isinstance(environment, dict) else {None: environment} if environment else {}
        for name, factory in factories.items():
            if not callable(factory):
                raise TypeError(f"environment{'' if name is None else f'[{name!r}]'} = {factory!r:.80} is not a "
                                "class or function that builds an environment; pass the class itself")
        self.factories = factories
        self.tools = list(tools)
        tools_by_name(self.tools)  # names unique, each usable
        self.max_turns, self.max_tool_calling_iterations = max_turns, max_tool_calling_iterations
        # "trl": TRL's environment_factory: reset gets the record's prompt too and its text is appended
        # to the prompt's last message; there is no step() (a method of that name is a tool)
        if convention not in ("rlora", "trl"):
            raise ValueError(f"convention={convention!r}; use 'rlora' or 'trl'")
        self.convention = convention
        self.reserved = RESERVED if convention == "rlora" else RESERVED - {"step"}

    @property
    def may_call_tools(self) -> bool:
        """Whether the model may be offered tools: standalone ones, or an environment class's."""
        return bool(self.tools) or any(
            inspect.isclass(f) and any(not n.startswith("_") and n not in self.reserved
                                       for n, _ in inspect.getmembers(f, inspect.isfunction))
            for f in self.factories.values())

    def environment_tools(self, instance: Any) -> list[Callable]:
        """The environment's public methods other than reset, step and get_reward, bound."""
        if instance is None:
            return []
        return [getattr(instance, name) for name, fn in inspect.getmembers(type(instance), inspect.isfunction)
                if not name.startswith("_") and name not in self.reserved]

    def start(self, prompt: Prompt, where: str) -> Episode:
        """A fresh episode for `prompt`: its environment built and reset with the record's columns."""
        metadata = dict(prompt.metadata)
        instance = None
        if self.factories:
            name = metadata.pop("environment", None) if None not in self.factories else None
            if name not in self.factories:
                raise ValueError(f"{where} names environment {name!r}, which is not one of "
                                 f"{sorted(k for k in self.factories if k is not None)}; give each record an "
                                 "'environment' column naming a key of the environment dict")
            factory = self.factories[name]
            try:
                instance = factory()
            except Exception as err:
                raise RuntimeError(f"the environment factory {_name(factory)} raised {type(err).__name__}: {err} "
                                   f"building the environment of {where}") from err
            if not callable(getattr(instance, "reset", None)):
                raise TypeError(f"the environment {type(instance).__name__} has no reset(**row) method; give it "
                                "one that returns the opening prompt (or None for the record's own)")
            if self.convention == "trl":  # the whole row, its prompt included; text is added to the prompt
                added = _call(instance, "reset", where, **({"prompt": prompt.prompt} | metadata))
                opening = None if added is None else _appended(prompt.prompt, added, type(instance).__name__, where)
            else:
                opening = _call(instance, "reset", where, **metadata)
        else:
            opening = None
        messages = _opening_messages(prompt.prompt if opening is None else opening, instance, where)
        tools = tools_by_name([*self.tools, *self.environment_tools(instance)])
        return Episode(messages, len(messages), instance, tools, tool_schemas(list(tools.values())) if tools else None)

    def respond(self, episodes: list[Episode], replies: list[str], last: list[bool],
                where: list[str]) -> list[list[dict[str, Any]] | None]:
        """What follows each episode's reply: its tool calls' results, then `step`'s messages.
        None where the episode ends: nothing follows, or `last` (the reply was its last turn,
        which `step` still sees). The environments' calls of one turn (async ones) run together."""
        limit = self.max_tool_calling_iterations
        results, capped = [], []
        for episode, reply, end in zip(episodes, replies, last):
            episode.turns += 1
            episode.messages.append({"role": "assistant", "content": reply})
            found, errors = parse_tool_calls(reply) if episode.tools else ([], [])
            capped.append(bool(found or errors) and limit is not None and episode.tool_turns >= limit)
            if (found or errors) and not end and not capped[-1]:
                episode.tool_turns += 1
                results.append(_tool_messages(episode, found, errors))
            else:
                results.append([])
        said = _call_all([(e, "step", w, (r,)) for e, r, w in zip(episodes, replies, where)
                          if self.convention == "rlora" and callable(getattr(e.environment, "step", None))])
        out: list[list[dict[str, Any]] | None] = []
        for episode, result, end, cap, w in zip(episodes, results, last, capped, where):
            following = result + _said_messages(said.get(id(episode)), type(episode.environment).__name__, w)
            if end or not following:
                episode.ended_by = episode.ended_by or ("max_turns" if end else "max_tool_calling_iterations" if cap
                                                        else "environment")
                out.append(None)
            else:
                episode.messages.extend(following)
                out.append(following)
        return out

    def finish(self, episodes: list[Episode], where: list[str]) -> None:
        """Each ended episode's `get_reward()`, where its environment has one (together, if async)."""
        got = _call_all([(e, "get_reward", w, ()) for e, w in zip(episodes, where)
                         if callable(getattr(e.environment, "get_reward", None))])
        for episode, w in zip(episodes, where):
            if id(episode) in got:
                value = got[id(episode)]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{type(episode.environment).__name__}.get_reward() returned {value!r} for "
                                     f"{w}; return a finite number")
                episode.reward = float(value)


def _tool_messages(episode: Episode, calls: list[ToolCall], errors: list[str]) -> list[dict[str, Any]]:
    """The tool messages of one reply's calls (and of calls it wrote but could not be read)."""
    messages = call_tools(calls, episode.tools) if calls else []
    messages += [{"role": "tool", "name": "unknown", "content": f"error: {e}", "error": True} for e in errors]
    episode.tool_calls += len(calls) + len(errors)
    episode.tool_errors += sum(bool(m.get("error")) for m in messages)
    return [{k: v for k, v in m.items() if k != "error"} for m in messages]


def _appended(prompt: Any, added: Any, environment: str, where: str) -> Any:
    """TRL's reading of `reset`'s text: added to the prompt's last message (or to a text prompt)."""
    if not isinstance(added, str):
        raise TypeError(f"{environment}.reset() returned {added!r:.80} for {where}; TRL's environments return text "
                        "(added to the prompt's last message) or None")
    if isinstance(prompt, str):
        return prompt + added
    return [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + added}]


def _opening_messages(opening: Any, instance: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(opening, str):
        return [{"role": "user", "content": opening}]
    if isinstance(opening, (list, tuple)) and opening and all(isinstance(m, dict) for m in opening):
        return [dict(m) for m in opening]
    what = f"{type(instance).__name__}.reset()" if instance is not None else "the prompt"
    raise TypeError(f"{what} for {where} gave {opening!r:.80}; an episode opens with text (a user message) or a "
                    "list of chat messages")


def _said_messages(said: Any, environment: str, where: str) -> list[dict[str, Any]]:
    """`step`'s return as messages: None -> none, text -> a user message, dicts as they are."""
    if said is None:
        return []
    if isinstance(said, str):
        return [{"role": "user", "content": said}]
    if isinstance(said, dict):
        said = [said]
    if isinstance(said, (list, tuple)) and all(isinstance(m, dict) and m.get("role") in ("user", "tool")
                                                and isinstance(m.get("content"), str) for m in said):
        return [dict(m) for m in said]
    raise TypeError(f"{environment}.step() returned {said!r:.80} for {where}; return text (a user message), messages "
                    "{'role': 'user' | 'tool', 'content': text}, or None")


def _call(instance: Any, method: str, where: str, *args, **kwargs) -> Any:
    """`instance.method(...)`, awaited if async; an error names the environment, method and record."""
    try:
        value = getattr(instance, method)(*args, **kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run_coroutine_threadsafe(_gather([value]), _background_loop()).result()[0]
            if isinstance(value, BaseException):
                raise value
    except Exception as err:
        raise _raised(instance, method, where, err) from err
    return value


def _call_all(calls: list[tuple[Episode, str, str, tuple]]) -> dict[int, Any]:
    """`episode.environment.<method>(*args)` for each call, keyed by the episode's id; the
    awaitables of async methods run together on the background loop."""
    out: dict[int, Any] = {}
    pending: dict[int, tuple[Any, Episode, str, str]] = {}
    for episode, method, where, args in calls:
        try:
            value = getattr(episode.environment, method)(*args)
        except Exception as err:
            for awaitable, *_ in pending.values():
                getattr(awaitable, "close", lambda: None)()
            raise _raised(episode.environment, method, where, err) from err
        if inspect.isawaitable(value):
            pending[id(episode)] = (value, episode, method, where)
        else:
            out[id(episode)] = value
    if pending:
        done = asyncio.run_coroutine_threadsafe(_gather([p[0] for p in pending.values()]), _background_loop()).result()
        for (key, (_, episode, method, where)), value in zip(pending.items(), done):
            if isinstance(value, BaseException):
                raise _raised(episode.environment, method, where, value) from value
            out[key] = value
    return out


def _raised(instance: Any, method: str, where: str, err: BaseException) -> RuntimeError:
    return RuntimeError(f"the environment {type(instance).__name__}.{method}() raised {type(err).__name__}: {err} "
                        f"in the episode of {where}; the run stops here (fix the environment, or catch the "
                        "error there and return a message)")


def _name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__
