"""Structured output: ``response_format`` JSON modes through the grammar engine (real server, real client).

The default model writes JSON that parses and validates against the request's schema, streamed or not; a
schema the engine cannot enforce is a 400 naming ``response_format``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from server_proc import ServerProcess

pytest_plugins = ("server_proc",)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "number"},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 2},
    },
    "required": ["city", "population_millions", "continent", "landmarks"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]


@pytest.fixture
async def client(api_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


async def test_json_schema_output_parses_and_validates_streamed_or_not(client: AsyncOpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    body: dict[str, Any] = {"model": "default", "messages": ASK, "max_tokens": 120, "response_format": fmt}
    for seed in (1, 2):
        out = await client.chat.completions.create(**body, temperature=0.8, seed=seed)
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content or ""), SCHEMA)
    stream = await client.chat.completions.create(**body, temperature=0, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_json_object_mode_gives_an_object(client: AsyncOpenAI) -> None:
    out = await client.chat.completions.create(
        model="default",
        messages=ASK,
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"repetition_penalty": 1.2},
    )
    content = out.choices[0].message.content or ""
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert content.startswith("{")


async def test_a_schema_the_engine_cannot_compile_is_a_400(client: AsyncOpenAI) -> None:
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="default", messages=ASK, max_tokens=4, response_format=bad)
    assert (refused.value.param or "").startswith("response_format")
