"""Tools: schemas, the shipped Hermes template, the template checks, parsing tool calls, running tools."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rlora.tiny import char_tokenizer
from rlora.tools import (
    HERMES_TOOL_TEMPLATE,
    TEMPLATES,
    ToolCall,
    call_tools,
    check_prefix_preserving,
    parse_tool_calls,
    renders_tools,
    require_tool_template,
    resolve_chat_template,
    tool_schemas,
    tools_by_name,
)

# SmolLM2-135M-Instruct's own chat template: ChatML, a default system prompt, no tools
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Consecutive tool messages share one user turn, as Qwen2.5's template renders them
GROUPED_TOOLS = (
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>{{ m.content }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Reasoning of assistant turns before the last user message dropped, as Qwen3's template does
STRIPS_REASONING = (
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m.content %}"
    "{% if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# An end-of-text mark after the last message only, gone once another follows
EOS_AFTER_LAST = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% if loop.last %}<|eos|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def get_weather(city: str, days: int = 1) -> dict:
    """Get the weather forecast of a city.

    Args:
        city: The city's name.
        days: How many days ahead.
    """
    return {"city": city, "days": days, "sky": "clear"}


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def no_docstring(a: int) -> int:
    return a


def no_type_hints(a):
    """Return a.

    Args:
        a: A value.
    """
    return a


def with_template(template: str | None):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


# --- schemas ---

def test_schema_of_a_typed_google_docstring_function():
    (schema,) = tool_schemas([get_weather])
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "get_weather" and function["description"] == "Get the weather forecast of a city."
    assert function["parameters"]["properties"] == {
        "city": {"type": "string", "description": "The city's name."},
        "days": {"type": "integer", "description": "How many days ahead."}}
    assert function["parameters"]["required"] == ["city"]


@pytest.mark.parametrize("tool,said", [(no_docstring, "no docstring"), (no_type_hints, "type hint")],
                         ids=["no-docstring", "no-type-hints"])
def test_a_tool_without_a_usable_schema_is_refused_by_name(tool, said):
    with pytest.raises(ValueError, match=rf"(?s)tool '{tool.__name__}'.*{said}.*Google-style docstring"):
        tool_schemas([add, tool])


def test_tools_by_name_refuses_duplicates_and_nameless_tools():
    assert tools_by_name([add, get_weather]) == {"add": add, "get_weather": get_weather}

    def make():
        def add(x: int) -> int:
            """Another add.

            Args:
                x: A number.
            """
            return x
        return add

    with pytest.raises(ValueError, match="two tools are named 'add'"):
        tools_by_name([add, make()])
    with pytest.raises(TypeError, match=r"tools\[0\].*no function name"):
        tools_by_name([lambda a: a])


def test_resolve_chat_template_names_and_literals():
    assert resolve_chat_template("hermes") is HERMES_TOOL_TEMPLATE is TEMPLATES["hermes"]
    assert resolve_chat_template(SMOLLM2_TEMPLATE) is SMOLLM2_TEMPLATE
    with pytest.raises(ValueError, match="'hermse' is neither a known name \\(hermes\\)"):
        resolve_chat_template("hermse")


# --- the shipped template ---

def test_hermes_template_renders_like_smollm2_without_tools():
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    ours, theirs = with_template(HERMES_TOOL_TEMPLATE), with_template(SMOLLM2_TEMPLATE)
    for messages in conversations:
        for prompt in (False, True):
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_hermes_template_lists_tools_and_renders_tool_messages_on_their_own():
    tok = with_template(HERMES_TOOL_TEMPLATE)
    schemas = tool_schemas([add, get_weather])
    sampled = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>'
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": sampled},
                {"role": "tool", "name": "add", "content": "4"}, {"role": "tool", "name": "add", "content": "5"}]
    text = tok.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    listed = text[text.index("<tools>\n") + len("<tools>\n"):text.index("\n</tools>")].split("\n")
    assert [json.loads(line) for line in listed] == schemas
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(f"<|im_start|>assistant\n{sampled}<|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert "<tools>" not in tok.apply_chat_template(messages, tokenize=False)


def test_hermes_template_writes_structured_tool_calls_only_without_markup():
    tok = with_template(HERMES_TOOL_TEMPLATE)
    calls = [ToolCall("add", {"a": 1, "b": 2}).to_dict(), {"name": "add", "arguments": '{"a": 3, "b": 4}'}]
    bare = tok.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": None, "tool_calls": calls}], tokenize=False)
    assert bare.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
                         '<|im_end|>\n')
    sampled = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    marked = tok.apply_chat_template([{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": sampled, "tool_calls": calls}], tokenize=False)
    assert marked.endswith(f"<|im_start|>assistant\n{sampled}<|im_end|>\n")  # as sampled, not twice
    assert parse_tool_calls(bare)[0] == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 3, "b": 4})]


# --- template checks ---

def test_renders_tools_and_require_tool_template():
    assert renders_tools(with_template(HERMES_TOOL_TEMPLATE))
    require_tool_template(with_template(HERMES_TOOL_TEMPLATE))
    assert not renders_tools(with_template(SMOLLM2_TEMPLATE))
    assert not renders_tools(with_template(None))
    with pytest.raises(ValueError, match=r"(?s)tokenizer.chat_template does not render the tools.*HERMES_TOOL_TEMPL"
                                         r"ATE.*tokenizer.chat_template: hermes"):
        require_tool_template(with_template(SMOLLM2_TEMPLATE))
    with pytest.raises(ValueError, match=r"no chat template \(tokenizer.chat_template is None\)"):
        require_tool_template(with_template(None))


@pytest.mark.parametrize("tools", [None, [add, get_weather], tool_schemas([add])], ids=["no-tools", "functions",
                                                                                       "schemas"])
def test_the_shipped_template_is_prefix_preserving(tools):
    check_prefix_preserving(with_template(HERMES_TOOL_TEMPLATE), tools=tools)


def test_a_template_without_tools_support_can_still_be_prefix_preserving():
    check_prefix_preserving(with_template(SMOLLM2_TEMPLATE))  # ChatML renders each message by itself


@pytest.mark.parametrize("template,change,was,now", [
    (GROUPED_TOOLS, "appending messages[4] ('tool')", "11</tool_response><|im_end|>", "11</tool_response><tool_resp"),
    (STRIPS_REASONING, "appending messages[6] ('user')", "<think>\\nI will call", "<tool_call>"),
    (EOS_AFTER_LAST, "appending messages[2] ('assistant')", "2?<|im_end|>\\n<|eos|><|im_start|>",
     "2?<|im_end|>\\n<|im_start|>assistant"),
], ids=["groups-tool-messages", "strips-earlier-reasoning", "marks-the-last-message"])
def test_a_template_that_re_renders_earlier_messages_is_refused(template, change, was, now):
    with pytest.raises(ValueError) as caught:
        check_prefix_preserving(with_template(template))
    said = str(caught.value)
    assert "not prefix-preserving" in said and change in said, said
    was_text, now_text = said.split(" it was ")[1].split(", now ")
    assert was in was_text and now in now_text, said
    assert "rlora.tools.HERMES_TOOL_TEMPLATE" in said


def test_a_template_that_fails_on_the_probe_is_refused_with_the_error():
    raising = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}" \
              "{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match=r"(?s)failed on a conversation of roles .*'tool'\].*no tools here"):
        check_prefix_preserving(with_template(raising))


# --- parsing ---

@pytest.mark.parametrize("text,calls", [
    ('Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     [ToolCall("add", {"a": 1, "b": 2})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> done',
     [ToolCall("add", {"a": 1, "b": 2}), ToolCall("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}</tool_call>',
     [ToolCall("add", {"a": 5, "b": 6})]),
    ('<tool_call>{"name": "add", "parameters": {"a": 7, "b": 8}}</tool_call>', [ToolCall("add", {"a": 7, "b": 8})]),
    ('<tool_call>{"name": "now"}</tool_call>', [ToolCall("now", {})]),
    ("The answer is 4.", []),
], ids=["one", "two", "arguments-as-json-string", "parameters", "no-arguments", "no-call"])
def test_parse_well_formed_calls(text, calls):
    assert parse_tool_calls(text) == (calls, [])


@pytest.mark.parametrize("text,error,n_calls", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
     '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>', "tool call 1 is not valid JSON", 1),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call><tool_call>{"name": "add", "argu',
     "tool call 2 has <tool_call> but no </tool_call>", 1),
    ('<tool_call>["add", 1]</tool_call>', "tool call 1 is list, not an object", 0),
    ('<tool_call>{"arguments": {}}</tool_call>', 'tool call 1 has no "name"', 0),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', '"arguments" of tool call 1 (add) are list', 0),
    ('<tool_call>{"name": "add", "arguments": "{a: 1}"}</tool_call>', "a string that is not valid JSON", 0),
], ids=["malformed-json", "unterminated", "not-an-object", "no-name", "arguments-not-an-object",
        "arguments-string-not-json"])
def test_parse_malformed_calls_gives_error_texts(text, error, n_calls):
    calls, errors = parse_tool_calls(text)
    assert len(calls) == n_calls and len(errors) == 1, (calls, errors)
    assert errors[0].startswith("error: ") and error in errors[0], errors


def test_a_tokenizer_with_its_own_response_parser_parses_with_it():
    tok = char_tokenizer()  # a made-up format, <call>...</call>, that the Hermes parser would not see
    tok.response_template = {
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {"content": {"content": "text"},
                   "tool_calls": {"open": "<call>", "close": "</call>", "content": "json", "repeats": True,
                                  "transform": {"type": "function", "function": "{content}"}}}}
    text = 'ok <call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call> <tool_call>{"name": "x"}</tool_call>'
    assert parse_tool_calls(text, tok) == ([ToolCall("add", {"a": 1, "b": 2})], [])
    assert parse_tool_calls(text) == ([ToolCall("x", {})], [])
    calls, errors = parse_tool_calls('<call>{"name": "add", "arguments": {</call>', tok)
    assert calls == [] and len(errors) == 1 and "could not be parsed" in errors[0]


# --- running tools ---

def test_call_tools_runs_sync_tools_and_encodes_results():
    messages = call_tools([ToolCall("add", {"a": 2, "b": 3}), ToolCall("get_weather", {"city": "Oslo"})],
                          tools_by_name([add, get_weather]))
    assert messages == [
        {"role": "tool", "name": "add", "content": "5", "error": False},
        {"role": "tool", "name": "get_weather", "content": '{"city": "Oslo", "days": 1, "sky": "clear"}',
         "error": False}]


async def slow_double(x: int) -> int:
    """Double x, slowly.

    Args:
        x: A number.
    """
    await asyncio.sleep(0.2)
    return 2 * x


async def slow_fail(x: int) -> int:
    """Fail, slowly.

    Args:
        x: A number.
    """
    await asyncio.sleep(0.2)
    raise RuntimeError(f"no luck with {x}")


def test_async_tools_of_one_reply_run_concurrently():
    tools = tools_by_name([slow_double, slow_fail, add])
    calls = [ToolCall("slow_double", {"x": 1}), ToolCall("add", {"a": 1, "b": 1}), ToolCall("slow_fail", {"x": 3}),
             ToolCall("slow_double", {"x": 4})]
    start = time.perf_counter()
    messages = call_tools(calls, tools)
    elapsed = time.perf_counter() - start
    assert [(m["content"], m["error"]) for m in messages] == [
        ("2", False), ("2", False), ("error: slow_fail raised RuntimeError: no luck with 3", True), ("8", False)]
    assert elapsed < 0.35, f"three 0.2 s async tools took {elapsed:.2f} s: they did not overlap"


def test_async_tools_run_inside_a_running_event_loop():
    async def notebook_cell():
        return call_tools([ToolCall("slow_double", {"x": 5})], {"slow_double": slow_double})

    assert asyncio.run(notebook_cell())[0]["content"] == "10"


def boom(x: int) -> int:
    """Raise.

    Args:
        x: A number.
    """
    raise ValueError(f"bad x {x}")


def inner_type_error(x: int) -> int:
    """Raise a TypeError from inside.

    Args:
        x: A number.
    """
    return x + "1"


@pytest.mark.parametrize("call,said", [
    (ToolCall("mul", {"a": 1}), "error: there is no tool named 'mul'; the tools are add, boom, inner_type_error"),
    (ToolCall("boom", {"x": 7}), "error: boom raised ValueError: bad x 7"),
    (ToolCall("add", {"a": 1, "c": 2}), "error: wrong arguments for add: "),
    (ToolCall("add", {"a": 1}), "error: wrong arguments for add: missing a required argument: 'b'"),
    (ToolCall("inner_type_error", {"x": 1}), "error: inner_type_error raised TypeError: "),
], ids=["unknown-tool", "raising-tool", "unexpected-argument", "missing-argument", "type-error-inside"])
def test_failing_calls_become_error_messages(call, said):
    (message,) = call_tools([call], tools_by_name([add, boom, inner_type_error]))
    assert message["error"] is True and message["role"] == "tool" and message["name"] == call.name
    assert message["content"].startswith(said), message["content"]


class Counter:
    """An environment whose methods are its tools (TRL's `environment_factory` form)."""

    def __init__(self):
        self.total = 0

    def increase(self, by: int) -> int:
        """Increase the counter.

        Args:
            by: How much to add.
        """
        self.total += by
        return self.total


def test_bound_methods_of_an_environment_are_tools():
    env = Counter()
    (schema,) = tool_schemas([env.increase])
    assert list(schema["function"]["parameters"]["properties"]) == ["by"]  # no `self`
    calls = [ToolCall("increase", {"by": 2}), ToolCall("increase", {"by": 3})]
    messages = call_tools(calls, tools_by_name([env.increase]))
    assert [m["content"] for m in messages] == ["2", "5"] and env.total == 5
