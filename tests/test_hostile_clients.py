"""Hostile clients: slow or malformed connections, deep JSON, huge prompts, clients that leave while queued.

The guards of api/guards.py on a single-device API app (real sockets, tiny model, short deadlines), and
one test against a real ``exo-stable serve`` process: ``/health`` stays fast while 4 MB prompts are refused.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hostile_peer import eventually
from server_proc import ServerProcess

from exo_stable.api.guards import ApiRunner
from exo_stable.api.server import TOKENIZING_KEY, ApiConfig, create_app
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.pipeline.service import InferenceService

pytest_plugins = ("server_proc",)


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("clients") / "tiny.gguf", default_gguf, layers=2, seed=7)


class App:
    def __init__(self, port: int, service: InferenceService, app: object) -> None:
        self.port = port
        self.root = f"http://127.0.0.1:{port}"
        self.service = service
        self.app = app


@pytest.fixture
async def guarded(tiny_model: Path) -> AsyncIterator[App]:
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    service = InferenceService(engine, max_active=1, admission_timeout_s=60)
    config = ApiConfig(header_timeout_s=0.5, body_timeout_s=0.5)
    app = create_app(service, config)
    runner = ApiRunner(app, header_timeout_s=config.header_timeout_s, access_log=None)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield App(runner.addresses[0][1], service, app)
    finally:
        await runner.cleanup()
        engine.close()


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:  # noqa: ASYNC109
    """Everything the server sends until it closes the connection (TimeoutError if it does not)."""
    async with asyncio.timeout(timeout):
        return await reader.read()


async def test_slow_headers_and_slow_bodies_are_closed(guarded: App) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", guarded.port) for _ in range(30)]
    for i, (_, writer) in enumerate(conns):
        if i % 3:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
    body_reader, body_writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    body_writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"')
    for reader, _ in conns:
        assert await closed_within(reader, 5.0) == b""
    answer = await closed_within(body_reader, 5.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    for _, writer in [*conns, (body_reader, body_writer)]:
        writer.close()
    # A well-behaved client is served as before.
    async with aiohttp.ClientSession() as http, http.get(f"{guarded.root}/health") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ],
)
async def test_parser_errors_are_json_errors(guarded: App, raw: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(raw)
    answer = await closed_within(reader, 5.0)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1].startswith(b"4"), head
    assert b"application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/tokenize"])
async def test_deeply_nested_json_is_a_400(guarded: App, path: str) -> None:
    deep = "[" * 10000 + "]" * 10000
    bodies = [
        '{"model": "m", "extra": ' + deep + ', "messages": [], "prompt": "x", "text": "x"}',
        '{"messages": [{"role": "user", "content": ' + deep + "}]}",
        '{"text": "' + "[" * 5000 + '"}',  # brackets inside a string do not count
    ]
    async with aiohttp.ClientSession() as http:
        for body in bodies[:2]:
            async with http.post(f"{guarded.root}{path}", data=body) as resp:
                payload = await resp.json()
                assert resp.status == 400, payload
                assert payload["error"]["code"] in ("invalid_json", "invalid_value"), payload
        if path == "/v1/tokenize":
            async with http.post(f"{guarded.root}{path}", data=bodies[2]) as resp:
                assert resp.status == 200


async def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(guarded: App) -> None:
    tokenizing = guarded.app[TOKENIZING_KEY]  # type: ignore[index]
    prompt = "word " * (tokenizing.max_prompt_bytes // 5 + 10)
    async with aiohttp.ClientSession() as http:
        for path, body in [
            ("/v1/completions", {"prompt": prompt}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
            ("/v1/tokenize", {"text": prompt}),
        ]:
            async with http.post(f"{guarded.root}{path}", json=body) as resp:
                payload = await resp.json()
                assert resp.status == 400 and payload["error"]["code"] == "context_length_exceeded", payload
    assert tokenizing.refused_by_length == 3


async def test_a_client_that_left_while_queued_is_not_run(guarded: App) -> None:
    service = guarded.service  # one request at a time: the second one queues
    async with aiohttp.ClientSession() as http:
        first = await http.post(
            f"{guarded.root}/v1/completions", json={"prompt": "hello", "max_tokens": 64, "stream": True}
        )
        await first.content.readline()  # the first is running
        queued = asyncio.create_task(
            http.post(f"{guarded.root}/v1/completions", json={"prompt": "queued", "max_tokens": 4})
        )
        slots = service._slots
        await eventually("the second request queued", lambda: bool(slots._waiters))  # type: ignore[attr-defined]
        queued.cancel()  # the client gives up: its connection closes
        await asyncio.gather(queued, return_exceptions=True)
        await first.read()
        first.release()
        await eventually("the first request done", lambda: not service.active)
    assert service.requests_started == 1, "the request of a client that left while queued was run"


POLLER = """
import select, sys, time, urllib.request
url, out = sys.argv[1], []
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    started = time.perf_counter()
    urllib.request.urlopen(url, timeout=10).read()
    out.append(time.perf_counter() - started)
print(" ".join(f"{x:.4f}" for x in out), flush=True)
"""


async def test_health_answers_fast_while_4mb_prompts_are_refused(api_server: ServerProcess) -> None:
    """The issue's stall: 4 MB prompts made /health take seconds. Refused by size, off the loop: it stays fast.
    /health is timed from another process, so that this test's own sending does not count."""
    prompt = "lorem ipsum " * (4_000_000 // 12)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}).encode()
    assert len(body) < 4 * 1024 * 1024
    poller = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        POLLER,
        f"{api_server.root}/health",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert poller.stdin is not None and poller.stdout is not None
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def big() -> None:
            for _ in range(5):
                data = io.BytesIO(body)  # a file-like body: aiohttp streams it rather than write 4 MB at once
                headers = {"Content-Type": "application/json"}
                async with http.post(f"{api_server.base_url}/chat/completions", data=data, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        async with asyncio.timeout(60):
            await poller.stdout.readline()  # polling /health from now on
            await asyncio.gather(*(big() for _ in range(4)))
            poller.stdin.write(b"stop\n")
            await poller.stdin.drain()
            latencies = [float(x) for x in (await poller.stdout.readline()).split()]
            await poller.wait()
    assert statuses == [400] * 20
    latencies.sort()
    print(
        f"/health while 4 clients sent 5 x 4 MB prompts each (refused): {len(latencies)} polls, median "
        f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    # Nine polls in ten within 100 ms (the rest is left to a shared CI machine's scheduler): before, tokenizing
    # on the event loop made every poll during a prompt wait for seconds.
    assert len(latencies) >= 10 and latencies[len(latencies) * 9 // 10 - 1] < 0.1, latencies
