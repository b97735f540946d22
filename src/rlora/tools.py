"""Tools for multi-turn episodes: their JSON schemas, a tool-capable chat template, checks that a
tokenizer's template renders tools and extends a conversation only by appending, parsing the tool
calls of a sampled reply, and running them.

The format is Hermes' (Qwen2.5, NousResearch Hermes, SmolLM3): the system message lists the tools'
JSON schemas inside `<tools></tools>`, the model calls one by writing
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its reply, and each result comes back
as a user turn holding `<tool_response>...</tool_response>`.

A tool is a plain function (or `async def`) with type hints and a Google-style docstring that
describes every argument; transformers' `get_json_schema` turns it into a schema. Malformed calls
and failing tools never raise: they come back as error text, which an episode can show the model.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Private helpers of the reward functions, shared so that tools and async rewards run on one loop
from rlora.rollout.rewards import _background_loop, _gather

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-Instruct's ChatML (same turns, same default system prompt) with Hermes-style tools. Each
# message renders on its own, whatever follows it, so appending a message only appends text: an
# assistant message is its `content` verbatim (the sampled text, tool-call markup included), its
# structured `tool_calls` written out only when the content holds no `<tool_call>`; every tool
# message is its own user turn, never grouped with the next.
HERMES_TOOL_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set first = 1 %}
{%- else %}
    {%- set system = '""" + SMOLLM_SYSTEM + r"""' %}
    {%- set first = 0 %}
{%- endif %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
    {{- '\n\n# Tools\n\nYou can call these functions, given as JSON schemas, one per line:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call one, write its name and a JSON object of its arguments inside tool_call '
        + 'tags:\n<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
        + 'Each result comes back inside <tool_response></tool_response> tags.' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages[first:] %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' + content }}
        {%- if message.tool_calls and '<tool_call>' not in content %}
            {%- for call in message.tool_calls %}
                {%- set function = call.function if call.function is defined else call %}
                {%- set arguments = function.arguments if function.arguments is defined else {} %}
                {%- if content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- '<tool_call>\n{"name": ' + (function.name | tojson) + ', "arguments": '
                    + (arguments if arguments is string else (arguments | tojson)) + '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + content + '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TEMPLATES = {"hermes": HERMES_TOOL_TEMPLATE}

FIX_TEMPLATE = ("set tokenizer.chat_template = rlora.tools.HERMES_TOOL_TEMPLATE (in a config: "
                "tokenizer.chat_template: hermes), or another template that renders `tools`")


def resolve_chat_template(value: str) -> str:
    """The chat template a config value names: a name of `TEMPLATES` ("hermes") gives that
    template, a Jinja template (text holding `{{` or `{%`) is returned as given. Anything else
    is refused, since it could only be a misspelt name."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r} is neither a known name ({', '.join(sorted(TEMPLATES))}) nor a Jinja "
                     "template; give one of those names or the template itself")


# --- schemas -----------------------------------------------------------------------------------

def tool_schemas(tools: Sequence[Callable]) -> list[dict]:
    """The JSON schema of each tool (transformers' `get_json_schema`), as `apply_chat_template(...,
    tools=...)` takes them: `{"type": "function", "function": {"name", "description", "parameters"}}`.
    Refuses a tool without a docstring describing each argument or without type hints, naming it."""
    from transformers.utils import get_json_schema

    out = []
    for i, tool in enumerate(tools):
        name = _tool_name(tool, i)
        try:
            out.append(get_json_schema(tool))
        except Exception as err:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(
                f"tool {name!r} has no usable JSON schema: {err}. Give it type hints on every argument and a "
                "Google-style docstring: a one-line description, then 'Args:' with one 'name: description' line "
                "per argument") from err
    return out


def tools_by_name(tools: Sequence[Callable]) -> dict[str, Callable]:
    """Each tool under its function name (the name its schema gives the model)."""
    out: dict[str, Callable] = {}
    for i, tool in enumerate(tools):
        name = _tool_name(tool, i)
        if name in out:
            raise ValueError(f"two tools are named {name!r}; give each tool a different function name")
        out[name] = tool
    return out


def _tool_name(tool: Any, i: int) -> str:
    if not callable(tool):
        raise TypeError(f"tools[{i}] = {tool!r:.80} is not callable; give each tool as a function")
    name = getattr(tool, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"tools[{i}] = {tool!r:.80} has no function name; give each tool as a `def` function, not "
                        "a lambda, partial or callable object")
    return name


# --- checking a tokenizer's chat template --------------------------------------------------------

def _probe_tool(x: int) -> int:
    """A probe tool that rlora renders to test whether a chat template lists tools.

    Args:
        x: A number.
    """
    return x


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders the tools it is given: a probe tool's name
    shows in `apply_chat_template(..., tools=[probe])`. False without a template, for a template
    that ignores `tools`, and for one that fails on them."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    schema = tool_schemas([_probe_tool])
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=schema, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that cannot take tools does not render them
        return False
    return _probe_tool.__name__ in text


def require_tool_template(tokenizer) -> None:
    """Raise unless the tokenizer's chat template renders tools (`renders_tools`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer has no chat template (tokenizer.chat_template is None), so it cannot show "
                         f"the model its tools; {FIX_TEMPLATE}")
    if not renders_tools(tokenizer):
        raise ValueError(f"tokenizer.chat_template does not render the tools it is given (a probe tool's name is "
                         f"missing from the rendered prompt), so the model would never see them; {FIX_TEMPLATE}")


def _probe_conversation(tools: list[dict] | None, system: bool) -> list[dict]:
    """A conversation with every kind of step an episode takes: a reply with reasoning and two
    tool calls, their two results, a final answer, a second user turn and its answer."""
    name = tools[0]["function"]["name"] if tools else "probe"
    calls = [{"type": "function", "function": {"name": name, "arguments": {"x": k}}} for k in (1, 2)]
    markup = "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {{"x": {k}}}}}\n</tool_call>' for k in (1, 2))
    return [
        *([{"role": "system", "content": "You check chat templates."}] if system else []),
        {"role": "user", "content": "What is probe of 1 and of 2?"},
        {"role": "assistant", "content": f"<think>\nI will call it twice.\n</think>\n\n{markup}", "tool_calls": calls},
        {"role": "tool", "name": name, "content": "11"},
        {"role": "tool", "name": name, "content": "22"},
        {"role": "assistant", "content": "<think>\nBoth came back.\n</think>\n\nThey are 11 and 22."},
        {"role": "user", "content": "And of 3?"},
        {"role": "assistant", "content": "33"},
    ]


def check_prefix_preserving(tokenizer, tools: Sequence[Callable | dict] | None = None) -> None:
    """Raise unless appending a message to a conversation only appends to its rendering.

    A probe conversation (`_probe_conversation`, with and without a system message) is rendered
    one message at a time. Each render must begin with the one before it; before an assistant
    message, the one before it is the render with the generation prompt plus the reply's text,
    as an episode samples it. Templates that re-render earlier messages fail: those that drop
    earlier reasoning (Qwen3's), group consecutive tool messages into one turn (Qwen2.5's), or
    render the last message differently. `tools` (functions or schemas) are rendered as given.
    """
    schemas = None if tools is None else [t if isinstance(t, dict) else tool_schemas([t])[0] for t in tools]
    for system in (True, False):
        messages = _probe_conversation(schemas, system)
        before = None
        for k in range(1 + system, len(messages) + 1):
            role = messages[k - 1]["role"]
            stages = [(_render(tokenizer, messages[:k], schemas, False), f"appending messages[{k - 1}] ({role!r})")]
            if k < len(messages) and messages[k]["role"] == "assistant":
                stages.append((_render(tokenizer, messages[:k], schemas, True) + messages[k]["content"],
                               f"the generation prompt and the sampled text of messages[{k}] (assistant)"))
            for text, change in stages:
                if before is not None and not text.startswith(before):
                    at = len(os.path.commonprefix([before, text]))
                    raise ValueError(
                        f"the chat template is not prefix-preserving: in a probe conversation of roles "
                        f"{[m['role'] for m in messages]}, {change} re-renders earlier text at character {at}: it "
                        f"was {before[max(0, at - 30):at + 40]!r}, now {text[max(0, at - 30):at + 40]!r}. An "
                        "episode extends its tokens by appending, so each message must render on its own whatever "
                        "follows it; set tokenizer.chat_template = rlora.tools.HERMES_TOOL_TEMPLATE (config: "
                        "tokenizer.chat_template: hermes) or another template that renders each message by itself")
                before = text


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:
        raise ValueError(f"the chat template failed on a conversation of roles {[m['role'] for m in messages]}: "
                         f"{type(err).__name__}: {err}; {FIX_TEMPLATE}") from err


# --- parsing tool calls --------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    """One call a reply asks for: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The call as chat messages hold it (an entry of an assistant message's `tool_calls`)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_tool_calls(text: str, tokenizer=None, prefix: str = "") -> tuple[list[ToolCall], list[str]]:
    """The tool calls of a sampled reply, in order, and an error text for each malformed one.

    With a tokenizer that has its own response parser (transformers' `parse_response` with a
    `response_template`, the successor of `response_schema`), that parser reads the reply, after
    `prefix`, the prompt text it continues (some templates open the reply in the prompt); where
    it fails on the reply as a whole, that is one error. Otherwise the Hermes format: each
    `<tool_call>...</tool_call>` holds `{"name": str, "arguments": {...}}` ("parameters" taken for
    "arguments", arguments also as a JSON string). An unclosed `<tool_call>` (a reply cut by the
    token budget) is an error; text outside the tags is ignored. Never raises on the text.
    """
    if getattr(tokenizer, "response_template", None) is not None and hasattr(tokenizer, "parse_response"):
        try:
            message = tokenizer.parse_response(text, prefix=prefix)
        except Exception as err:
            return [], [f"error: the reply could not be parsed ({type(err).__name__}: {err})"]
        found = (message.get("tool_calls") or []) if isinstance(message, dict) else []
        calls, errors = [], []
        for k, raw in enumerate(found):
            raw = raw.get("function", raw) if isinstance(raw, dict) else raw
            _add(_to_call(raw, f"tool call {k + 1}"), calls, errors)
        return calls, errors
    return _parse_hermes(text)


def _parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    calls: list[ToolCall] = []
    errors: list[str] = []
    position, k = 0, 0
    while (start := text.find(OPEN, position)) != -1:
        k += 1
        end = text.find(CLOSE, start + len(OPEN))
        if end == -1:
            errors.append(f"error: tool call {k} has {OPEN} but no {CLOSE} (the reply ended inside it)")
            break
        body = text[start + len(OPEN):end].strip()
        position = end + len(CLOSE)
        try:
            raw = json.loads(body)
        except json.JSONDecodeError as err:
            errors.append(f"error: tool call {k} is not valid JSON ({err.msg} at character {err.pos}): {body[:80]!r}")
            continue
        _add(_to_call(raw, f"tool call {k}"), calls, errors)
    return calls, errors


def _to_call(raw: Any, where: str) -> ToolCall | str:
    """A parsed call object as a ToolCall, or the error text saying what is wrong with it."""
    if not isinstance(raw, dict):
        return f'error: {where} is {type(raw).__name__}, not an object {{"name": ..., "arguments": {{...}}}}'
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return f'error: {where} has no "name" (a string): {json.dumps(raw)[:80]}'
    arguments = raw.get("arguments", raw.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return f"error: the arguments of {where} ({name}) are a string that is not valid JSON ({err.msg})"
    if not isinstance(arguments, dict):
        return f'error: the "arguments" of {where} ({name}) are {type(arguments).__name__}, not an object'
    return ToolCall(name, arguments)


def _add(parsed: ToolCall | str, calls: list[ToolCall], errors: list[str]) -> None:
    (calls if isinstance(parsed, ToolCall) else errors).append(parsed)


# --- running tools -------------------------------------------------------------------------------

def call_tools(calls: Sequence[ToolCall], tools: dict[str, Callable]) -> list[dict[str, Any]]:
    """Run each call and return one tool message per call, in order:
    `{"role": "tool", "name": name, "content": text, "error": bool}`.

    `content` is the result (a string as is, anything else JSON-encoded where possible, else
    `str`), or on failure an error text for the model: "error: ..." for an unknown tool, arguments
    the function does not take, or an exception it raised. `error` says which; chat templates
    ignore the key. Never raises for a failing tool. Plain functions run one after another in
    this thread; `async def` tools (anything returning an awaitable) are awaited together, so they
    overlap, on rlora's background event loop (that of async reward functions), which works
    inside a running loop (a notebook) too.
    """
    messages: list[dict[str, Any]] = []
    pending: dict[int, Any] = {}  # message index -> awaitable
    for call in calls:
        fn = tools.get(call.name)
        if fn is None:
            known = ", ".join(sorted(tools)) or "none"
            messages.append(_message(call.name, f"error: there is no tool named {call.name!r}; the tools are {known}",
                                     True))
            continue
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as err:
            messages.append(_message(call.name, f"error: wrong arguments for {call.name}: {err}", True))
            continue
        except ValueError:  # no signature to check (some builtins): the call itself will tell
            pass
        try:
            result = fn(**call.arguments)
        except Exception as err:
            messages.append(_message(call.name, _raised(call.name, err), True))
            continue
        if inspect.isawaitable(result):
            pending[len(messages)] = result
            messages.append(_message(call.name, "", False))  # filled in below
        else:
            messages.append(_message(call.name, _as_text(result), False))
    if pending:
        outcomes = asyncio.run_coroutine_threadsafe(_gather(list(pending.values())), _background_loop()).result()
        for i, outcome in zip(pending, outcomes):
            failed = isinstance(outcome, BaseException)
            messages[i]["content"] = _raised(messages[i]["name"], outcome) if failed else _as_text(outcome)
            messages[i]["error"] = failed
    return messages


def _message(name: str, content: str, error: bool) -> dict[str, Any]:
    return {"role": "tool", "name": name, "content": content, "error": error}


def _raised(name: str, err: BaseException) -> str:
    return f"error: {name} raised {type(err).__name__}: {err}"


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)
