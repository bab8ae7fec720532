"""Tool calls: rendered into the model's template, parsed back from each family's format, forced by a grammar.

The default model's template does not read ``tools``: it gets them the Hermes way (system prompt, calls in
``<tool_call>`` tags, results in ``<tool_response>``); Qwen2's template (llama.cpp's vocabulary vectors)
reads them itself. Against a real server with the real ``openai`` client: a forced call (named or
``required``) always parses and validates against the tool's parameters, streamed as OpenAI streams calls,
with ``finish_reason: "tool_calls"``, and the call and its result go back into the next prompt.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import openai
import pytest
from openai import AsyncOpenAI
from server_proc import ServerProcess
from vocab_vectors import vocab_dir_fixture  # noqa: F401  (the vocab_dir fixture)

from exo_stable.api import schemas as s
from exo_stable.api import tools
from exo_stable.tokenizer import Tokenizer

pytest_plugins = ("server_proc",)

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK: Any = [{"role": "user", "content": "What is the weather like in Paris?"}]
NAMES = frozenset({"get_weather"})


@pytest.fixture
async def client(api_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',  # Hermes / Qwen
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # Mistral
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.x
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.x, bare JSON
    ],
)
def test_each_familys_call_format_parses(text: str) -> None:
    content, calls = tools.parse(text, NAMES)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_text_that_is_no_call_stays_text_and_streams() -> None:
    assert tools.parse('{"name": "unknown_tool", "arguments": {}}', NAMES)[1] == []
    assert tools.parse("It is sunny <tool_call> maybe", NAMES)[1] == []
    stream = tools.ToolStream(NAMES)
    sent = [stream.push(t) for t in ["It is", " sunny. <tool", "_call>\n", '{"name": "get_weather", "arguments": {}}']]
    assert "".join(sent) == "It is sunny. "
    tail, calls = stream.finish()
    assert tail == "" and [c.name for c in calls] == ["get_weather"]


def _request(**extra: Any) -> s.ChatCompletionRequest:
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C and sunny"},
    ]
    body = {"messages": conversation, "tools": [WEATHER], **extra}
    return msgspec.json.decode(json.dumps(body).encode(), type=s.ChatCompletionRequest)


def test_tools_calls_and_results_reach_a_template_that_reads_tools_and_one_that_does_not(
    vocab_dir: Path, default_gguf: Path
) -> None:
    for tok in (Tokenizer.from_gguf(vocab_dir / "ggml-vocab-qwen2.gguf"), Tokenizer.from_gguf(default_gguf)):
        plan = tools.plan(_request(), tok.chat_template)
        assert plan is not None and plan.names == NAMES
        prompt = tok.render_chat(plan.messages, tools=plan.template_tools)
        assert "get_weather" in prompt and "The weather in a city" in prompt, prompt
        assert "18 C and sunny" in prompt and '"city": "Paris"' in prompt, prompt
    none = tools.plan(_request(tool_choice="none"), tok.chat_template)
    assert none is not None and none.names == frozenset() and "<tools>" not in tok.render_chat(none.messages)


async def test_a_named_call_is_forced_and_validates(client: AsyncOpenAI) -> None:
    out = await client.chat.completions.create(
        model="default",
        messages=ASK,
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0.7,
        seed=3,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)


async def test_a_required_call_streams_as_openai_streams_calls(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="default",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finishes = []
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += (delta.function.name or "") if delta.function else ""
                entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"] and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS)


async def test_the_call_and_its_result_go_back_and_the_model_answers(client: AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    message = first.choices[0].message
    assert message.tool_calls
    history: Any = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C and sunny"},
    ]
    answer = await client.chat.completions.create(
        model="default", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    auto = await client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0
    )
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls


async def test_tool_choice_must_name_a_given_tool(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        await client.chat.completions.create(
            model="default",
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert unknown.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as nothing:
        await client.chat.completions.create(model="default", messages=ASK, tool_choice="required")
    assert nothing.value.param == "tool_choice"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    first = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\n'
    two = first + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    stream = tools.ToolStream(NAMES, single=True)
    stream.push(two)
    assert [c.arguments for c in stream.finish()[1]] == ["{}"]
    assert len(tools.parse(two, NAMES)[1]) == 2
