"""Every OpenAI request field is honoured or refused by name (a real ``exo-stable serve`` and the real client).

Refused: each with a 400 whose ``param`` names it. Honoured: the model's names and aliases (an unknown one is
a 404 ``model_not_found``), the sampling controls (penalties, logit bias, min-p, deterministic with a seed)
and log-probabilities in OpenAI's shapes, streamed and not, the same values both ways.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from server_proc import ServerProcess, assert_openai_error

pytest_plugins = ("server_proc",)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def client(api_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def http(api_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(api_server.root, timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def post(http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(path, json=body) as resp:
        return resp.status, await resp.json()


REFUSED_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "Hi", "extra": 1}]}, "messages[0].extra"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "bob"}]}, "messages[0].name"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"store": True}, "store"),
    ({"metadata": {"k": "v"}}, "metadata"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"n": 2}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"not-a-token": 5}}, "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"),
]


@pytest.mark.parametrize(("extra", "param"), REFUSED_CHAT, ids=[p for _, p in REFUSED_CHAT])
async def test_chat_fields_that_cannot_be_honoured_are_refused_by_name(
    http: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    status, out = await post(http, CHAT, {"messages": HI, "max_tokens": 2, **extra})
    error = assert_openai_error(status, out, 400)
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix"), ({"echo": True, "logprobs": 1}, "logprobs")],
)
async def test_completion_fields_that_cannot_be_honoured_are_refused_by_name(
    http: aiohttp.ClientSession, extra: dict[str, Any], param: str
) -> None:
    status, out = await post(http, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, **extra})
    assert assert_openai_error(status, out, 400)["param"] == param


async def test_non_text_content_parts_are_refused(client: AsyncOpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
            max_tokens=2,
        )
    assert refused.value.param == "messages[0].content[1].type"
    assert refused.value.code == "unsupported_content"


async def test_unknown_models_are_404_and_the_served_one_answers_to_its_names(
    client: AsyncOpenAI, api_server: ServerProcess
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"
    stem = api_server.model.removesuffix(".gguf").split(".")[0]
    for name in (api_server.model, stem.upper(), "default"):
        out = await client.chat.completions.create(model=name, messages=HI, max_tokens=1, temperature=0)
        assert out.model == api_server.model


async def test_logit_bias_forces_and_bans_tokens(client: AsyncOpenAI, api_server: ServerProcess) -> None:
    plain = await client.completions.create(model="default", prompt="The sky is", max_tokens=4, temperature=0)
    tokenizer_ids = await _ids(api_server, " blue")
    forced = await client.completions.create(
        model="default",
        prompt="The sky is",
        max_tokens=3,
        temperature=0.8,
        seed=5,
        logit_bias={str(tokenizer_ids[0]): 100},
    )
    assert forced.choices[0].text == " blue" * 3
    first = (await _ids(api_server, plain.choices[0].text))[0]
    banned = await client.completions.create(
        model="default", prompt="The sky is", max_tokens=4, temperature=0, logit_bias={str(first): -100}
    )
    assert (await _ids(api_server, banned.choices[0].text))[0] != first


async def _ids(server: ServerProcess, text: str) -> list[int]:
    async with aiohttp.ClientSession(server.root) as http, http.post("/v1/tokenize", json={"text": text}) as resp:
        ids: list[int] = (await resp.json())["ids"]
    return ids


async def test_penalties_change_the_answer_and_are_reproducible_with_a_seed(client: AsyncOpenAI) -> None:
    prompt = "List the numbers: one one one one one one"
    body: dict[str, Any] = {"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    plain = (await client.completions.create(**body)).choices[0].text
    penalized = {"frequency_penalty": 1.5, "presence_penalty": 1.0, "extra_body": {"repetition_penalty": 1.5}}
    greedy = (await client.completions.create(**body, **penalized)).choices[0].text
    assert greedy != plain, "the penalties changed nothing"
    sampled = {**body, **penalized, "temperature": 0.9, "seed": 42, "extra_body": {"min_p": 0.05, "top_k": 40}}
    first = (await client.completions.create(**sampled)).choices[0].text
    again = (await client.completions.create(**sampled)).choices[0].text
    assert first == again


async def test_chat_logprobs_streamed_equal_unstreamed(client: AsyncOpenAI) -> None:
    body: dict[str, Any] = {
        "model": "default",
        "messages": HI,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = await client.chat.completions.create(**body)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.logprob == e.top_logprobs[0].logprob, "greedy picks the likeliest token"
        assert e.bytes is not None and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-6
    stream = await client.chat.completions.create(**body, stream=True)
    streamed = [e async for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


async def test_completion_logprobs_in_openais_shape(client: AsyncOpenAI) -> None:
    body: dict[str, Any] = {"model": "default", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    out = await client.completions.create(**body, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == out.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and all(len(d) <= 2 for d in lp.top_logprobs)
    stream = await client.completions.create(**body, logprobs=2, stream=True)
    tokens = [t async for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.tokens or []]
    assert tokens == lp.tokens
    plain = await client.completions.create(**body)
    assert plain.choices[0].logprobs is None


async def test_embeddings_are_refused_with_501(http: aiohttp.ClientSession) -> None:
    status, out = await post(http, "/v1/embeddings", {"model": "default", "input": "hello"})
    assert assert_openai_error(status, out, 501)["code"] == "not_implemented"
