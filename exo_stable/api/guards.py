"""What keeps one client from stalling the node: bounded, deadlined work off the event loop.

- **Slow connections**: :class:`ApiRunner` serves the API with a request handler that closes a connection
  whose request headers do not arrive within ``header_timeout_s`` (from its first byte, or from the
  connect); a body must arrive within ``body_timeout_s`` (:func:`read_json`, a 408).
- **Parser errors** (a malformed request line or header) are answered in the API's JSON error shape, not
  aiohttp's plain text.
- **JSON** nested deeper than :data:`MAX_JSON_DEPTH` is a 400 before it is decoded (no ``RecursionError``).
- **Prompts** longer than the context could hold, judged by their bytes (no token is longer than the
  vocabulary's longest), are refused before tokenizing; tokenizing and chat-template rendering run on a
  small thread pool with a deadline (:class:`Tokenizing`), so the loop keeps answering ``/health``.
- **Event-loop lag** is measured all the time (:class:`LoopLag`) and exported as a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Final, TypeVar

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exo_stable.api.errors import ApiError, error_json
from exo_stable.tokenizer import Tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_JSON_DEPTH: Final = 64
_OFF_LOOP_BYTES: Final = 64 << 10  # bodies larger than this are scanned and decoded on the pool
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string (unrolled: no catastrophic backtracking)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (brackets inside strings do not count)."""
    opening = body.count(b"[") + body.count(b"{")
    if opening <= MAX_JSON_DEPTH:
        return opening  # an upper bound, below the limit: no need to look closer
    brackets = _STRING.sub(b"", body).translate(None, delete=_NOT_BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, dtype=np.uint8)]).max())


def _check_and_decode(body: bytes, kind: type[T]) -> T:
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise ApiError.from_decode_error(exc) from exc
    except RecursionError as exc:  # a backstop: the depth check above comes first
        raise ApiError(400, "JSON nested too deep", code="invalid_json") from exc


class Tokenizing:
    """A small thread pool for tokenizing and chat-template rendering, each call with a deadline.

    Also the byte bound of a prompt: a text of more than ``context_length * longest_token_bytes`` bytes
    needs more tokens than the context holds, whatever they are, so it is refused without tokenizing.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, *, workers: int = 2, timeout_s: float = 10.0):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        longest = max((len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)), default=1)
        self.max_prompt_bytes = context_length * max(longest, 1)
        self.timeouts = 0
        self.refused_by_length = 0

    def check_length(self, texts: Iterable[str], param: str) -> None:
        """Refuse texts too long for the context by their size alone (each character is at most 4 bytes)."""
        total = 0
        for text in texts:
            total += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            if total > self.max_prompt_bytes:
                self.refused_by_length += 1
                raise ApiError(
                    400,
                    f"The prompt is longer than this model's context of {self.context_length} tokens could hold "
                    f"(over {self.max_prompt_bytes} bytes)",
                    param=param,
                    code="context_length_exceeded",
                )

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except TimeoutError as exc:
            self.timeouts += 1
            raise ApiError(
                400, f"Tokenizing the prompt took longer than {self.timeout_s:.0f}s", code="prompt_too_complex"
            ) from exc

    async def decode(self, body: bytes, kind: type[T]) -> T:
        """Check ``body``'s JSON depth and decode it: on the pool when it is large."""
        if len(body) <= _OFF_LOOP_BYTES:
            return _check_and_decode(body, kind)
        return await self.run(_check_and_decode, body, kind)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request's body, or a 408 (and the connection closed) if it does not arrive in time."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError as exc:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:.0f}s", code="request_timeout") from exc


class LoopLag:
    """How late the event loop runs a timer: sampled every ``interval_s``; the last and the recent maximum."""

    def __init__(self, interval_s: float = 0.05, window_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.last_s = 0.0
        self.samples = 0
        self._recent: list[tuple[float, float]] = []  # (at, lag) of lags above 10 ms, within the window

    @property
    def max_recent_s(self) -> float:
        cutoff = time.monotonic() - self.window_s
        self._recent = [(at, lag) for at, lag in self._recent if at >= cutoff]
        return max((lag for _, lag in self._recent), default=self.last_s)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            self.last_s = lag
            self.samples += 1
            if lag > 0.01:
                self._recent.append((time.monotonic(), lag))
                if len(self._recent) > 1024:
                    del self._recent[:512]

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: the sampling task lives as long as the app."""
        task = asyncio.create_task(self.run(), name="event-loop lag")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class GuardCollector(Collector):
    def __init__(self, lag: LoopLag, tokenizing: Tokenizing, runner_stats: dict[str, int]) -> None:
        self.lag = lag
        self.tokenizing = tokenizing
        self.runner_stats = runner_stats

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "exo_stable_event_loop_lag_seconds", "How late the event loop ran its last timer", value=self.lag.last_s
        )
        yield GaugeMetricFamily(
            "exo_stable_event_loop_lag_max_seconds",
            f"The event loop's largest lag in the last {self.lag.window_s:.0f}s",
            value=self.lag.max_recent_s,
        )
        yield GaugeMetricFamily(
            "exo_stable_slow_connections_closed",
            "Connections closed because their request headers did not arrive in time",
            value=self.runner_stats.get("slow_headers", 0),
        )
        yield GaugeMetricFamily(
            "exo_stable_prompts_refused_by_length",
            "Prompts refused by their size before tokenizing",
            value=self.tokenizing.refused_by_length,
        )


class _GuardedHandler(RequestHandler):
    """aiohttp's request handler with a header deadline and JSON parser errors."""

    header_timeout_s: float = 10.0
    stats: dict[str, int]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
        elif data and self._header_timer is None and self._idle():
            self._arm()  # the first bytes of a request's headers: they get a deadline

    def _idle(self) -> bool:
        """Waiting for a request's first bytes. Not while one is queued or handled, nor in the moment between
        the two (the request taken off the queue, its handler not started yet): a body arriving then would
        arm the header deadline, which would close the connection in the middle of a long streamed answer."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._request_in_progress and not self._messages

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.stats["slow_headers"] = self.stats.get("slow_headers", 0) + 1
        log.info("closed a connection whose request headers took over %.0fs", self.header_timeout_s)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; cannot send an error instead")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("malformed request from %s: %s", request.remote, message or exc)
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        error = ApiError(
            status,
            f"{phrase}: {message or exc or ''}".strip(": ")[:500] if status < 500 else "internal error",
            type="invalid_request_error" if status < 500 else "server_error",
            code="bad_request" if status < 500 else "internal_error",
        )
        response = web.Response(status=status, body=error_json(error), content_type="application/json")
        response.force_close()
        return response


class _GuardedServer(Server):
    header_timeout_s: float = 10.0
    stats: dict[str, int]

    def __call__(self) -> RequestHandler:
        handler = _GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_s = self.header_timeout_s
        handler.stats = self.stats
        return handler


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections get the guards above."""

    def __init__(self, app: web.Application, *, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        kwargs.setdefault("lingering_time", 1.0)  # the rest of a refused body is read this long, then closed
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.stats: dict[str, int] = app.get(RUNNER_STATS_KEY, {})

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        assert isinstance(server, _GuardedServer)
        server.header_timeout_s = self.header_timeout_s
        server.stats = self.stats
        return server


RUNNER_STATS_KEY = web.AppKey("runner_stats", dict[str, int])
