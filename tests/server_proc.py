"""Start a real ``exo-stable serve`` subprocess for the HTTP API tests, and stop it cleanly.

Test modules load this file as a plugin (``pytest_plugins = ("server_proc",)``) to share its session-scoped
servers: ``api_server`` with the default flags, and ``limited_server`` with an API key, a small body cap and
a small max-tokens cap. Test modules also import its helpers, before pytest could rewrite its asserts, so
it opts out of assert rewriting (PYTEST_DONT_REWRITE): its asserts carry their own messages.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

READY = re.compile(rb"exo-stable: serving (\S+) \((\S+)\) on (http://127\.0\.0\.1:(\d+)/v1)")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

API_KEY = "test-key-7f3a"
BODY_CAP = 2048
MAX_TOKENS_CAP = 32


@dataclass
class ServerProcess:
    """One running server: its process, where it listens, and its log (stderr)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    model: str
    dtype: str
    base_url: str  # ends in /v1
    port: int

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @classmethod
    def start(cls, *flags: str) -> ServerProcess:
        log_file = tempfile.NamedTemporaryFile(prefix="exo-stable-serve-", suffix=".log", delete=False)  # noqa: SIM115
        log_path = Path(log_file.name)
        args = [sys.executable, "-m", "exo_stable", "serve", "--host", "127.0.0.1", "--port", "0"]
        args += [*_alone_flags(), *flags]
        env = dict(os.environ)
        for name in ("EXO_STABLE_API_KEY", "EXO_STABLE_PEERS", "EXO_STABLE_CLUSTER_SECRET"):
            env.pop(name, None)  # only the flags given here configure the server
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL, env=env)
        log_file.close()
        try:
            match = _wait_ready(proc, START_TIMEOUT_S)
        except Exception as exc:
            _stop(proc)
            log = log_path.read_text(encoding="utf-8", errors="replace")
            log_path.unlink(missing_ok=True)
            raise RuntimeError(f"{exc}\nthe server's log:\n{log[-4000:]}") from exc
        return cls(
            proc=proc,
            log_path=log_path,
            model=match.group(1).decode(),
            dtype=match.group(2).decode(),
            base_url=match.group(3).decode(),
            port=int(match.group(4)),
        )

    def stop(self) -> int:
        """SIGTERM, wait with a deadline (kill if needed); return the exit status."""
        return _stop(self.proc)


@functools.cache
def _alone_flags() -> tuple[str, ...]:
    """Flags that keep a test server a node of its own: no peer discovery, and a secret no other node knows."""
    usage = subprocess.run(
        [sys.executable, "-m", "exo_stable", "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    flags: list[str] = []
    if "--no-discovery" in usage:
        flags.append("--no-discovery")
    if "--cluster-secret" in usage:
        flags += ["--cluster-secret", secrets.token_hex(16)]
    return tuple(flags)


def case_named(oracle: dict[str, Any], name: str) -> dict[str, Any]:
    """The oracle's case called ``name``."""
    (case,) = [c for c in oracle["cases"] if c["name"] == name]
    return cast(dict[str, Any], case)


def _wait_ready(proc: subprocess.Popen[bytes], timeout_s: float) -> re.Match[bytes]:
    """Read the server's stdout until its ready line, the process exits, or the deadline passes."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"server exited ({proc.wait(timeout=10)}) before it was ready: {seen!r}")
            seen += chunk
            if match := READY.search(seen):
                return match
    raise TimeoutError(f"server not ready within {timeout_s:.0f}s; stdout so far: {seen!r}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def _serve(*flags: str) -> Iterator[ServerProcess]:
    server = ServerProcess.start(*flags)
    try:
        yield server
    finally:
        status = server.stop()
        log = server.log()
        server.log_path.unlink(missing_ok=True)
    assert status == 0, f"server exited with {status}; its log:\n{log[-4000:]}"
    assert "Traceback" not in log, f"the server logged a traceback:\n{log[-4000:]}"


@pytest.fixture(scope="session")
def api_server(default_gguf: Path) -> Iterator[ServerProcess]:
    """The default model served with the default flags."""
    yield from _serve("--model", str(default_gguf))


@pytest.fixture(scope="session")
def limited_server(default_gguf: Path) -> Iterator[ServerProcess]:
    """A server that requires ``API_KEY`` and caps bodies at ``BODY_CAP`` bytes and max_tokens at ``MAX_TOKENS_CAP``."""
    yield from _serve(
        "--model",
        str(default_gguf),
        "--api-key",
        API_KEY,
        "--max-body-bytes",
        str(BODY_CAP),
        "--max-tokens-cap",
        str(MAX_TOKENS_CAP),
    )


# --- reading responses -----------------------------------------------------------------------------


def assert_openai_error(status: int, body: Any, expected_status: int) -> dict[str, Any]:
    """``body`` is an OpenAI error object for an HTTP ``status`` of ``expected_status``; return its error."""
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return cast(dict[str, Any], error)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The data payload of every server-sent event of ``resp``, in order, read to the end."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream"), resp.headers
    events: list[str] = []
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))
    assert not data, f"the stream ended inside an event: {data}"
    return events


@dataclass
class Streamed:
    """A streamed completion (chat or text) read from raw SSE, checked for its framing."""

    deltas: list[str]
    finish_reasons: list[str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def finish_reason(self) -> str:
        assert len(self.finish_reasons) == 1, self.finish_reasons
        return self.finish_reasons[0]


async def stream_request(
    http: aiohttp.ClientSession, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Streamed:
    """POST ``body`` with ``stream: true`` and check I3's framing: one finish reason, then ``[DONE]`` last."""
    async with http.post(path, json={**body, "stream": True}, headers=headers) as resp:
        events = await sse_events(resp)
    assert events, "empty stream"
    assert events[-1] == "[DONE]", events[-3:]
    assert "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    chat = path.endswith("/chat/completions")
    out = Streamed(deltas=[], finish_reasons=[], chunks=chunks)
    for chunk in chunks:
        assert "error" not in chunk, chunk
        assert out.usage is None, "a chunk came after the usage chunk"
        if not chunk["choices"]:
            out.usage = chunk["usage"]
            continue
        assert not out.finish_reasons, "a chunk came after the one with the finish reason"
        (choice,) = chunk["choices"]
        text = choice["delta"].get("content") if chat else choice["text"]
        if text:
            out.deltas.append(text)
        if choice["finish_reason"] is not None:
            out.finish_reasons.append(choice["finish_reason"])
    assert len(out.finish_reasons) == 1, out.finish_reasons
    assert len({c["id"] for c in chunks}) == 1, "chunks of one stream carry different ids"
    return out
