"""Bad requests get a 4xx with an OpenAI error object, and the ``openai`` client raises the matching error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from server_proc import ServerProcess, assert_openai_error

pytest_plugins = ("server_proc",)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def client(api_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def http(api_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(api_server.root, timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def send(http: aiohttp.ClientSession, method: str, path: str, data: bytes) -> tuple[int, Any]:
    async with http.request(method, path, data=data, headers={"Content-Type": "application/json"}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


BAD_CHAT_BODIES: dict[str, tuple[bytes, str | None]] = {
    # name: (body, the param the error names)
    "malformed json": (b'{"messages": [', None),
    "not an object": (b"[1, 2]", None),
    "max_tokens a string": (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": "a"}', "max_tokens"),
    "max_tokens zero": (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}', "max_tokens"),
    "messages not a list": (b'{"messages": "Hi"}', "messages"),
    "messages empty": (b'{"messages": []}', "messages"),
    "missing messages": (b'{"max_tokens": 4}', None),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "Hi"}]}', "messages[0].role"),
    "n=2": (b'{"messages": [{"role": "user", "content": "Hi"}], "n": 2}', "n"),
    "temperature 5": (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 5}', "temperature"),
    "top_p 0": (b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}', "top_p"),
    "stream not a bool": (b'{"messages": [{"role": "user", "content": "Hi"}], "stream": "yes"}', "stream"),
}


@pytest.mark.parametrize("name", list(BAD_CHAT_BODIES))
async def test_bad_chat_requests_are_400(http: aiohttp.ClientSession, name: str) -> None:
    body, param = BAD_CHAT_BODIES[name]
    status, out = await send(http, "POST", CHAT, body)
    error = assert_openai_error(status, out, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if name == "missing messages":
        assert "messages" in error["message"]
    if name == "malformed json":
        assert error["code"] == "invalid_json"


BAD_OTHER_BODIES: dict[str, tuple[str, bytes]] = {
    "completion without prompt": ("/v1/completions", b'{"max_tokens": 2}'),
    "completion with two prompts": ("/v1/completions", b'{"prompt": ["a", "b"], "max_tokens": 2}'),
    "completion with a mixed prompt": ("/v1/completions", b'{"prompt": [1, "b"], "max_tokens": 2}'),
    "completion id out of vocab": ("/v1/completions", b'{"prompt": [1, 99999999], "max_tokens": 2}'),
    "completion with an empty prompt": ("/v1/completions", b'{"prompt": "", "max_tokens": 2}'),
    "tokenize with nothing": ("/v1/tokenize", b"{}"),
    "tokenize with both": ("/v1/tokenize", b'{"text": "a", "messages": [{"role": "user", "content": "a"}]}'),
    "tokenize a number": ("/v1/tokenize", b'{"text": 5}'),
}


@pytest.mark.parametrize("name", list(BAD_OTHER_BODIES))
async def test_bad_completion_and_tokenize_requests_are_400(http: aiohttp.ClientSession, name: str) -> None:
    path, body = BAD_OTHER_BODIES[name]
    status, out = await send(http, "POST", path, body)
    assert_openai_error(status, out, 400)


async def test_prompt_longer_than_the_context_is_400(http: aiohttp.ClientSession) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 1000  # 10 tokens per sentence: ~10000 tokens
    async with http.post("/v1/tokenize", json={"text": text}) as resp:
        n_tokens = len((await resp.json())["ids"])
    assert n_tokens > 8192
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": text, "max_tokens": 2}),
    ]:
        async with http.post(path, json=body) as resp:
            error = assert_openai_error(resp.status, await resp.json(), 400)
        assert error["code"] == "context_length_exceeded"
        assert str(n_tokens) in error["message"] or "context" in error["message"]


async def test_unknown_route_is_404_and_wrong_method_is_405(http: aiohttp.ClientSession) -> None:
    status, out = await send(http, "POST", "/v1/nowhere", b"{}")
    assert_openai_error(status, out, 404)
    status, out = await send(http, "GET", "/nowhere", b"")
    assert_openai_error(status, out, 404)
    status, out = await send(http, "GET", CHAT, b"")
    assert_openai_error(status, out, 405)
    status, out = await send(http, "DELETE", "/v1/models", b"")
    assert_openai_error(status, out, 405)


async def test_the_openai_client_raises_matching_errors(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_temperature:
        await client.chat.completions.create(model="default", messages=HI, max_tokens=2, temperature=5)
    assert bad_temperature.value.status_code == 400
    assert bad_temperature.value.param == "temperature"

    with pytest.raises(openai.BadRequestError) as bad_n:
        await client.chat.completions.create(model="default", messages=HI, max_tokens=2, n=2)
    assert bad_n.value.param == "n"

    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="default", messages=HI, max_tokens=2, stream=True, n=2)

    with pytest.raises(openai.InternalServerError) as no_embeddings:
        await client.embeddings.create(model="default", input="hello")
    assert no_embeddings.value.status_code == 501
    assert no_embeddings.value.code == "not_implemented"
