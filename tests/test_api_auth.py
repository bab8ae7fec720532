"""A server started with --api-key, --max-body-bytes and --max-tokens-cap enforces them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from server_proc import API_KEY, BODY_CAP, MAX_TOKENS_CAP, ServerProcess, assert_openai_error, stream_request

pytest_plugins = ("server_proc",)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
TINY = {"messages": HI, "max_tokens": 1, "temperature": 0}


@pytest.fixture
async def http(limited_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(limited_server.root, timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


BEARER = {"Authorization": f"Bearer {API_KEY}"}


async def request(
    http: aiohttp.ClientSession, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, path, headers=headers, json=body) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", CHAT, TINY),
        ("POST", "/v1/tokenize", {"text": "a"}),
        ("GET", "/v1/x", None),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"X-Api-Key": "wrong-key"},
        {"Authorization": API_KEY},  # no scheme
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": f"Bearer {API_KEY[:-1]}"},
    ],
    ids=["none", "wrong-bearer", "wrong-x-api-key", "no-scheme", "basic", "longer", "shorter"],
)
async def test_v1_without_the_right_key_is_401(
    http: aiohttp.ClientSession, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    status, out = await request(http, method, path, headers, body)
    error = assert_openai_error(status, out, 401)
    assert error["type"] == "authentication_error"


@pytest.mark.parametrize(
    "headers", [BEARER, {"authorization": f"bearer {API_KEY}"}, {"X-Api-Key": API_KEY}], ids=["bearer", "lower", "x"]
)
async def test_the_right_key_is_accepted(
    http: aiohttp.ClientSession, limited_server: ServerProcess, headers: dict[str, str]
) -> None:
    status, out = await request(http, "GET", "/v1/models", headers)
    assert status == 200, out
    assert [m["id"] for m in out["data"]] == [limited_server.model]
    status, out = await request(http, "POST", CHAT, headers, TINY)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 1


async def test_health_is_open_without_a_key(http: aiohttp.ClientSession) -> None:
    status, out = await request(http, "GET", "/health", {})
    assert status == 200
    assert out["status"] == "ok"


async def test_openai_client_uses_the_key(limited_server: ServerProcess) -> None:
    async with AsyncOpenAI(base_url=limited_server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        stream = await client.chat.completions.create(model="default", messages=HI, max_tokens=2, stream=True)
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].finish_reason]) == 1

    async with AsyncOpenAI(base_url=limited_server.base_url, api_key="wrong", max_retries=0, timeout=120) as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="default", messages=HI, max_tokens=2)
    assert denied.value.status_code == 401


async def test_body_over_the_cap_is_413(http: aiohttp.ClientSession) -> None:
    fits = {**TINY, "user": "x" * (BODY_CAP - 200)}
    status, out = await request(http, "POST", CHAT, BEARER, fits)
    assert status == 200, out
    big = {"messages": [{"role": "user", "content": "x" * (BODY_CAP + 1)}], "max_tokens": 1}
    status, out = await request(http, "POST", CHAT, BEARER, big)
    error = assert_openai_error(status, out, 413)
    assert str(BODY_CAP) in error["message"]
    status, out = await request(http, "POST", "/v1/tokenize", BEARER, {"text": "y" * (4 * BODY_CAP)})
    assert_openai_error(status, out, 413)
    # the server still answers on a fresh request afterwards
    status, out = await request(http, "POST", CHAT, BEARER, TINY)
    assert status == 200, out


async def test_max_tokens_over_the_cap_is_400(http: aiohttp.ClientSession) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        status, out = await request(http, "POST", CHAT, BEARER, {"messages": HI, field: MAX_TOKENS_CAP + 1})
        error = assert_openai_error(status, out, 400)
        assert error["param"] == "max_tokens"
    status, out = await request(http, "POST", "/v1/completions", BEARER, {"prompt": "a", "max_tokens": 10**9})
    assert_openai_error(status, out, 400)


async def test_without_max_tokens_the_cap_applies(http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": "Count from 1 to 100, comma separated."}], "temperature": 0}
    streamed = await stream_request(http, CHAT, {**body, "stream_options": {"include_usage": True}}, BEARER)
    assert streamed.usage is not None
    assert 1 <= streamed.usage["completion_tokens"] <= MAX_TOKENS_CAP
    if streamed.finish_reason == "length":
        assert streamed.usage["completion_tokens"] == MAX_TOKENS_CAP
