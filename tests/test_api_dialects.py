"""Anthropic's Messages API and Ollama's API through their real Python clients, on a real ``exo-stable serve``.

Each dialect is a thin layer over the same service: greedy replies equal the OpenAI dialect's for the same
conversation, streamed equals unstreamed, and validation, model names, limits and auth answer each client in
its own error shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import ollama
import pytest
from openai import AsyncOpenAI
from server_proc import API_KEY, ServerProcess

pytest_plugins = ("server_proc",)

SYSTEM = "You are a helpful assistant. Answer in one sentence."
ASK = "What is the capital of France?"


@pytest.fixture
async def claude(api_server: ServerProcess) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=api_server.root, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def llama(api_server: ServerProcess) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=api_server.root, timeout=120) as client:
        yield client


async def openai_reply(server: ServerProcess, max_tokens: int) -> tuple[str, str | None]:
    async with AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        out = await client.chat.completions.create(
            model="default",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}],
            max_tokens=max_tokens,
            temperature=0,
        )
    return out.choices[0].message.content or "", out.choices[0].finish_reason


async def test_anthropic_messages_equal_the_openai_reply_streamed_or_not(
    claude: anthropic.AsyncAnthropic, api_server: ServerProcess
) -> None:
    expected, finish = await openai_reply(api_server, 24)
    body: dict[str, Any] = {
        "model": "default",
        "max_tokens": 24,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [{"type": "text", "text": ASK}]}],
        "extra_body": {"temperature": 0},
    }
    message = await claude.messages.create(**body)
    assert message.type == "message" and message.role == "assistant" and message.model == api_server.model
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == expected  # type: ignore[union-attr]
    assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[finish or ""]
    assert message.usage.output_tokens >= 1 and message.usage.input_tokens > 10

    async with claude.messages.stream(**body) as stream:
        streamed = "".join([text async for text in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == expected
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens


async def test_anthropic_stop_sequences_name_the_one_that_stopped(
    claude: anthropic.AsyncAnthropic, api_server: ServerProcess
) -> None:
    expected, _ = await openai_reply(api_server, 24)
    word = expected.split()[2]
    message = await claude.messages.create(
        model="default",
        max_tokens=24,
        system=SYSTEM,
        messages=[{"role": "user", "content": ASK}],
        extra_body={"temperature": 0},
        stop_sequences=["#never#", word],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert word not in message.content[0].text  # type: ignore[union-attr]


async def test_anthropic_errors_come_in_anthropics_shape(claude: anthropic.AsyncAnthropic) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.messages.create(model="claude-opus-4", max_tokens=4, messages=hi)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    tool = {"name": "f", "input_schema": {"type": "object"}}
    tool = {"name": "f", "input_schema": {"type": "object"}}
    with pytest.raises(anthropic.BadRequestError) as choice:
        await claude.messages.create(
            model="default",
            max_tokens=4,
            messages=hi,  # type: ignore[arg-type]
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "g"},
        )
    assert "tool_choice" in choice.value.body["error"]["message"]  # type: ignore[index]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as picture:
        await claude.messages.create(
            model="default",
            max_tokens=4,
            messages=[{"role": "user", "content": [image]}],  # type: ignore[list-item]
        )
    assert "messages[0].content[0]" in picture.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(model="default", max_tokens=4, messages=hi, extra_body={"temperature": 1.5})


async def test_ollama_chat_and_generate_equal_the_openai_reply_streamed_or_not(
    llama: ollama.AsyncClient, api_server: ServerProcess
) -> None:
    expected, _ = await openai_reply(api_server, 24)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    options = {"temperature": 0, "num_predict": 24, "repeat_penalty": 1.0}
    whole = await llama.chat(model="default", messages=messages, options=options, stream=False)
    assert whole.message.content == expected and whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count and whole.prompt_eval_count
    parts = [part async for part in await llama.chat(model="default", messages=messages, options=options, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == expected
    assert parts[-1].done and not any(p.done for p in parts[:-1])

    generated = await llama.generate(model="default", system=SYSTEM, prompt=ASK, options=options, stream=False)
    assert generated.response == expected
    streamed = [
        p async for p in await llama.generate(model="default", system=SYSTEM, prompt=ASK, options=options, stream=True)
    ]
    assert "".join(p.response for p in streamed) == expected


async def test_ollama_lists_shows_and_refuses_in_its_shape(
    llama: ollama.AsyncClient, api_server: ServerProcess
) -> None:
    listed = await llama.list()
    assert [m.model for m in listed.models] == [api_server.model]
    shown = await llama.show("default")
    assert shown.modelinfo and shown.modelinfo["llama.context_length"] > 0
    with pytest.raises(ollama.ResponseError) as missing:
        await llama.chat(model="llama3:8b", messages=[{"role": "user", "content": "Hi"}], stream=False)
    assert missing.value.status_code == 404 and "llama3:8b" in missing.value.error
    with pytest.raises(ollama.ResponseError) as option:
        await llama.generate(model="default", prompt="Hi", options={"mirostat": 2}, stream=False)
    assert option.value.status_code == 400 and "options.mirostat" in option.value.error
    with pytest.raises(ollama.ResponseError) as picture:
        await llama.generate(model="default", prompt="Hi", images=["AAAA"], stream=False)
    assert picture.value.status_code == 400 and "images" in picture.value.error


async def test_every_dialect_needs_the_key_when_one_is_set(limited_server: ServerProcess) -> None:
    async with anthropic.AsyncAnthropic(base_url=limited_server.root, api_key="wrong", max_retries=0) as claude:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await claude.messages.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with anthropic.AsyncAnthropic(base_url=limited_server.root, api_key=API_KEY, max_retries=0) as claude:
        ok = await claude.messages.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert ok.usage.output_tokens >= 1
        with pytest.raises(anthropic.BadRequestError):  # the server's max-tokens cap holds here too
            await claude.messages.create(model="default", max_tokens=99, messages=[{"role": "user", "content": "Hi"}])
    async with ollama.AsyncClient(host=limited_server.root) as keyless:
        with pytest.raises(ollama.ResponseError) as no_key:
            await keyless.list()
    assert no_key.value.status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with ollama.AsyncClient(host=limited_server.root, headers=headers) as keyed:
        assert (await keyed.list()).models
    async with aiohttp.ClientSession() as http, http.post(f"{limited_server.root}/api/chat", data=b"{") as resp:
        assert resp.status == 401 and set(await resp.json()) == {"error"}


async def test_ollama_format_and_anthropic_output_config_give_json_of_the_schema(
    llama: ollama.AsyncClient, claude: anthropic.AsyncAnthropic
) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        "required": ["capital", "country"],
        "additionalProperties": False,
    }
    options = {"temperature": 0, "num_predict": 60}
    reply = await llama.chat(
        model="default", messages=[{"role": "user", "content": ASK}], format=schema, options=options
    )
    assert set(json.loads(reply.message.content or "")) == {"capital", "country"}
    message = await claude.messages.create(
        model="default",
        max_tokens=60,
        messages=[{"role": "user", "content": ASK}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0},
    )
    assert set(json.loads(message.content[0].text)) == {"capital", "country"}  # type: ignore[union-attr]


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
    "additionalProperties": False,
}


async def test_anthropic_tool_use_forced_streamed_and_round_tripped(claude: anthropic.AsyncAnthropic) -> None:
    tools: Any = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA}]
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    body: dict[str, Any] = {
        "model": "default",
        "max_tokens": 60,
        "messages": ask,
        "tools": tools,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": {"temperature": 0},
    }
    message = await claude.messages.create(**body)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"}  # type: ignore[union-attr,arg-type]
    async with claude.messages.stream(**body) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [use.input]  # type: ignore[union-attr]

    history: Any = [
        *ask,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},  # type: ignore[union-attr]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]},  # type: ignore[union-attr]
    ]
    answer = await claude.messages.create(
        model="default", max_tokens=12, messages=history, tools=tools, tool_choice={"type": "none"}
    )
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")


async def test_ollama_takes_tools_and_their_results(llama: ollama.AsyncClient) -> None:
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    messages: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
    ]
    reply = await llama.chat(
        model="default", messages=messages, tools=tools, options={"temperature": 0, "num_predict": 16}
    )
    assert reply.done and (reply.message.content or reply.message.tool_calls)
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather"
