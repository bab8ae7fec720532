"""aiohttp application serving the OpenAI-compatible API of one node.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``POST /v1/tokenize``,
``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /v1/traces/{id}`` (a recent request's trace).
Every error is an OpenAI error object. ``/v1/*`` requires the API key when one is set.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from exo_stable.api import fields, tools
from exo_stable.api import schemas as s
from exo_stable.api.errors import ApiError, error_json
from exo_stable.api.guards import RUNNER_STATS_KEY, GuardCollector, LoopLag, Tokenizing, read_body
from exo_stable.api.logprobs import LogprobCursor
from exo_stable.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from exo_stable.api.metrics import BatchCollector, Metrics, RequestObserver, ServiceCollector
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.textstream import Delta
from exo_stable.logs import REQUEST_ID
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.pipeline.recovery import ReplayMode
from exo_stable.pipeline.service import (
    GenerationJob,
    GenerationResult,
    Service,
    ServiceBusy,
    ServiceOverloaded,
    ServiceUnavailable,
)
from exo_stable.pipeline.trace import TraceRing
from exo_stable.tokenizer import ChatMessage
from exo_stable.web import add_routes as add_web_routes

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ApiConfig:
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_cap: int = 4096
    trace_ring: int = 128  # traces of this many recent requests are kept for GET /v1/traces/{id}
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this (api/guards.py)
    body_timeout_s: float = 30.0  # ... and its body within this
    tokenize_timeout_s: float = 10.0  # tokenizing or rendering one prompt (off the event loop) takes at most this


SERVICE_KEY = web.AppKey("service", Service)
CONFIG_KEY = web.AppKey("config", ApiConfig)
METRICS_KEY = web.AppKey("metrics", Metrics)
TRACES_KEY = web.AppKey("traces", TraceRing)
TOKENIZING_KEY = web.AppKey("tokenizing", Tokenizing)
LAG_KEY = web.AppKey("loop_lag", LoopLag)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=s.encoder.encode(body), status=status, content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return web.Response(body=error_json(error), status=error.status, content_type="application/json", headers=headers)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Whatever a handler logs carries its request's id (set by ``_Run``) and nothing leaks to the next one."""
    token = REQUEST_ID.set(None)
    try:
        return await handler(request)
    finally:
        REQUEST_ID.reset(token)


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    try:
        if config.api_key and request.path.startswith(("/v1/", "/api/")):
            _check_key(request, config.api_key)
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc)
        if exc.status == 408:
            response.force_close()  # the rest of a late body would be read as the next request
        return response
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            ApiError(413, f"Request body exceeds {config.max_body_bytes} bytes", code="request_too_large")
        )
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            ApiError(405, f"Method {request.method} not allowed on {request.path}", code=str(exc.status))
        )
    except web.HTTPNotFound:
        return error_response(ApiError(404, f"No route {request.method} {request.path}", code="not_found"))
    except web.HTTPException:
        raise
    except ConnectionResetError as exc:  # the client went away before its answer: nothing broke here
        log.info("%s %s: the client went away: %r", request.method, request.path, exc)
        return web.Response(status=499)
    except Exception as exc:  # answered as an OpenAI error object; logged with its traceback
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ApiError(500, f"internal error: {exc}", type="server_error", code="internal_error"))


def _check_key(request: web.Request, api_key: str) -> None:
    given = request.headers.get("X-Api-Key", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "Invalid or missing API key", type="authentication_error", code="invalid_api_key")


async def _decode(request: web.Request, kind: type[T]) -> T:
    """The body as ``kind``: within the body deadline, depth-checked, large ones decoded off the loop."""
    body = await read_body(request, request.app[CONFIG_KEY].body_timeout_s)
    return await request.app[TOKENIZING_KEY].decode(body, kind)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _sampling(
    req: s._Sampling,
    max_tokens: int | None,
    config: ApiConfig,
    service: Service,
    prompt: list[int],
    *,
    logprobs: int | None = None,
    grammar: str = "",
) -> tuple[SamplingParams, int]:
    limit = fields.token_limit(service, config.max_tokens_cap, len(prompt), max_tokens)
    vocab = service.tokenizer.vocab_size
    params = fields.sampling_params(req, prompt=prompt, vocab_size=vocab, logprobs=logprobs, grammar=grammar)
    return params, limit


def _replay(req: s._Sampling) -> ReplayMode | None:
    return None if req.exo_replay is None else ReplayMode(req.exo_replay)


def _validation(req: s._Sampling) -> ValidationLevel | None:
    return None if req.exo_validation is None else ValidationLevel(req.exo_validation)


class _Run:
    """One admitted request: its job, its stream of deltas, and ``result``, the deltas' counters folded in
    as they pass (usage, finish reason, token ids, log-probabilities, first token time)."""

    def __init__(self, request: web.Request, job: GenerationJob, kind: str, *, trace: bool = False) -> None:
        self.service = request.app[SERVICE_KEY]
        self.metrics = request.app[METRICS_KEY]
        self.job = job
        self.result = GenerationResult(prompt_tokens=len(job.prompt_ids))
        self.id = uuid.uuid4().hex
        self.response_id = f"{kind}-{self.id}"  # the response's "id": names the request in logs and traces
        self.created = int(time.time())
        self.want_trace = trace  # the request asked for its trace's summary in the response ("exo_trace")
        self.trace = request.app[TRACES_KEY].open(
            self.response_id, backend=self.service.backend, prompt_tokens=len(job.prompt_ids)
        )
        REQUEST_ID.set(self.response_id)

    def traced(self, body: Any) -> Any:
        """``body`` with the trace's summary as ``exo_trace`` when the request asked for it."""
        if not self.want_trace:
            return body
        self.trace.tokens(self.result.completion_tokens, self.result.first_token_s)
        self.trace.finish_reason = self.result.finish_reason
        out = msgspec.to_builtins(body)
        out["exo_trace"] = self.trace.summary()
        return out

    def usage(self) -> s.Usage:
        r = self.result
        return s.Usage(r.prompt_tokens, r.completion_tokens, r.prompt_tokens + r.completion_tokens)

    async def deltas(self) -> AsyncGenerator[Delta]:
        """The service's deltas, with every token's arrival observed for /metrics."""
        observer = RequestObserver(self.metrics, len(self.job.prompt_ids))
        outcome = "error"
        try:
            async with aclosing(self.service.stream(self.job, self.trace)) as deltas:
                async for delta in deltas:
                    self.result.add(delta)
                    observer.on_tokens(delta.completion_tokens)
                    self.trace.tokens(self.result.completion_tokens, self.result.first_token_s)
                    yield delta
            outcome = self.result.finish_reason or "unfinished"
        except GeneratorExit:
            outcome = "cancelled"  # the consumer stopped reading: the client went away
            raise
        finally:
            observer.end(outcome)
            self.trace.tokens(self.result.completion_tokens, self.result.first_token_s)
            self.trace.end(self.result.finish_reason or outcome)
            r = self.result
            ttft = "-" if r.first_token_s is None else f"{r.first_token_s:.3f}s"
            log.info(
                "%s: %s after %d prompt + %d completion tokens, first token %s",
                self.response_id,
                outcome,
                r.prompt_tokens,
                r.completion_tokens,
                ttft,
            )


async def _admitted(service: Service, request: web.Request) -> None:
    if (reason := service.unavailable()) is not None:
        raise ApiError(503, reason, type="server_error", code="unavailable")
    try:
        await service.admit()
    except ServiceOverloaded as exc:
        raise ApiError(
            429, str(exc), type="rate_limit_error", code="queue_full", retry_after_s=exc.retry_after_s
        ) from exc
    except ServiceBusy as exc:
        raise ApiError(503, str(exc), type="server_error", code="server_busy") from exc
    if _client_gone(request):  # it left while queued: nothing is run for it
        service.release()
        log.info("%s %s: the client left while queued", request.method, request.path)
        raise ApiError(499, "the client closed the request", code="client_closed_request")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service, config = request.app[SERVICE_KEY], request.app[CONFIG_KEY]
    req = await _decode(request, s.ChatCompletionRequest)
    fields.resolve_model(req.model, service)
    fields.check_chat(req)
    tooling = tools.plan(req, service.tokenizer.chat_template)
    prompt = await fields.chat_prompt(request.app[TOKENIZING_KEY], _chat_messages(req.messages), tooling)
    want = (req.top_logprobs or 0) if req.logprobs else None
    forced = "" if tooling is None else tooling.grammar
    grammar = await fields.checked_grammar(
        forced or fields.response_grammar(req.response_format), service.tokenizer, "response_format"
    )
    single = req.parallel_tool_calls is False
    calls = tools.ToolStream(frozenset() if tooling is None else tooling.names, single=single)
    limit_asked = req.max_completion_tokens or req.max_tokens
    params, limit = _sampling(req, limit_asked, config, service, prompt, logprobs=want, grammar=grammar)
    job = GenerationJob(prompt, params, limit, req.stop_list(), _replay(req), validation=_validation(req))
    run = _Run(request, job, "chatcmpl", trace=req.exo_trace)
    model = service.model_name
    cursor = LogprobCursor(service.tokenizer, run.result)

    def logprobs(final: bool) -> s.ChatLogprobs | None:
        return None if want is None else s.ChatLogprobs(cursor.chat(cursor.take(final)))

    await _admitted(service, request)
    try:
        if not req.stream:
            text = "".join([d.text async for d in _collect(run, request)])
            content, found = tools.parse(text, calls.names) if calls.names else (text, [])
            found = found[:1] if single else found
            message = s.ChatMessageOut("assistant", content, tool_calls=tools.calls_out(found) if found else None)
            finish = "tool_calls" if found else run.result.finish_reason
            choice = s.ChatChoice(0, message, finish, logprobs(True))
            body = s.ChatCompletion(f"chatcmpl-{run.id}", run.created, model, [choice], run.usage())
            return json_response(run.traced(body))

        def chunk(delta: s.ChatDelta, finish: str | None = None, lp: bool = False) -> s.ChatCompletionChunk:
            choice = s.ChatChunkChoice(0, delta, finish, logprobs(finish is not None) if lp else None)
            return s.ChatCompletionChunk(f"chatcmpl-{run.id}", run.created, model, [choice])

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _sse(
            request,
            run,
            first=chunk(s.ChatDelta(role="assistant", content="")),
            make=(lambda d: chunk(s.ChatDelta(content=d.text) if d.text else s.ChatDelta(), d.finish_reason, lp=True))
            if not calls.names
            else lambda d: _tool_chunk(calls, d, chunk),
            usage=(
                lambda: s.ChatCompletionChunk(
                    f"chatcmpl-{run.id}", run.created, model, [], usage=run.usage() if include_usage else None
                )
            )
            if include_usage or req.exo_trace
            else None,
        )
    finally:
        service.release()


async def completions(request: web.Request) -> web.StreamResponse:
    service, config = request.app[SERVICE_KEY], request.app[CONFIG_KEY]
    req = await _decode(request, s.CompletionRequest)
    tokenizing = request.app[TOKENIZING_KEY]
    fields.resolve_model(req.model, service)
    fields.check_completion(req)
    if isinstance(req.prompt, str):
        tokenizing.check_length([req.prompt], "prompt")
        prompt = await tokenizing.run(service.tokenizer.encode, req.prompt)
        prompt_text = req.prompt
    elif req.prompt and all(isinstance(x, int) for x in req.prompt):
        prompt = [int(x) for x in req.prompt]
        if any(not 0 <= t < service.tokenizer.vocab_size for t in prompt):
            raise ApiError(400, "prompt token id out of the vocabulary", param="prompt", code="invalid_value")
        if len(prompt) > service.context_length:
            raise ApiError(400, "The prompt is longer than the context", param="prompt", code="context_length_exceeded")
        prompt_text = await tokenizing.run(service.tokenizer.decode, prompt)
    elif len(req.prompt) == 1:
        prompt_text = str(req.prompt[0])
        tokenizing.check_length([prompt_text], "prompt")
        prompt = await tokenizing.run(service.tokenizer.encode, prompt_text)
    else:
        raise ApiError(400, "Only one prompt per request is supported", param="prompt", code="unsupported_value")
    if req.echo and req.logprobs is not None:
        raise fields.refused("logprobs", "the prompt's log-probabilities (echo with logprobs) are not computed")
    params, limit = _sampling(req, req.max_tokens, config, service, prompt, logprobs=req.logprobs)
    job = GenerationJob(prompt, params, limit, req.stop_list(), _replay(req), validation=_validation(req))
    run = _Run(request, job, "cmpl", trace=req.exo_trace)
    model = service.model_name
    prefix = prompt_text if req.echo else ""
    cursor = LogprobCursor(service.tokenizer, run.result)
    offset = len(prefix)

    def logprobs(final: bool) -> s.CompletionLogprobs | None:
        nonlocal offset
        if req.logprobs is None:
            return None
        out, offset = cursor.completion(cursor.take(final), offset)
        return out

    await _admitted(service, request)
    try:
        if not req.stream:
            text = prefix + "".join([d.text async for d in _collect(run, request)])
            choice = s.CompletionChoice(0, text, run.result.finish_reason, logprobs(True))
            return json_response(
                run.traced(s.Completion(f"cmpl-{run.id}", run.created, model, [choice], usage=run.usage()))
            )

        def chunk(text: str, finish: str | None = None, lp: bool = False) -> s.Completion:
            choice = s.CompletionChoice(0, text, finish, logprobs(finish is not None) if lp else None)
            return s.Completion(f"cmpl-{run.id}", run.created, model, [choice])

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _sse(
            request,
            run,
            first=chunk(prefix) if prefix else None,
            make=lambda d: chunk(d.text, d.finish_reason, lp=True),
            usage=(
                lambda: s.Completion(
                    f"cmpl-{run.id}", run.created, model, [], usage=run.usage() if include_usage else None
                )
            )
            if include_usage or req.exo_trace
            else None,
        )
    finally:
        service.release()


async def _collect(run: _Run, request: web.Request) -> AsyncGenerator[Delta]:
    """The deltas of an unstreamed reply; a client that goes away meanwhile stops the generation."""
    try:
        async with aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                if request.transport is None or request.transport.is_closing():
                    log.info("client disconnected from %s after %d tokens", run.id, run.result.completion_tokens)
                    raise ApiError(499, "the client closed the request", code="client_closed_request")
                yield delta
    except TimeoutError as exc:
        raise ApiError(504, f"generation stalled: {exc}", type="server_error", code="timeout") from exc
    except ServiceUnavailable as exc:
        raise ApiError(503, str(exc), type="server_error", code="unavailable") from exc


async def _sse(
    request: web.Request,
    run: _Run,
    *,
    first: Any | None,
    make: Callable[[Delta], Any],
    usage: Callable[[], Any] | None,
) -> web.StreamResponse:
    """Stream deltas as server-sent events; end with one finish reason and ``[DONE]`` or an error event."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)

    async def send(obj: Any) -> None:
        await response.write(b"data: " + s.encoder.encode(obj) + b"\n\n")

    try:
        if first is not None:
            await send(first)
        async with aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                await send(make(delta))
        if usage is not None:
            await send(run.traced(usage()))  # the trace's summary, when asked for, rides the last chunk
    except (ConnectionResetError, ConnectionError) as exc:
        # The client went away: closing the iterator above already freed the request's cache.
        log.info("client disconnected from %s after %d tokens: %s", run.id, run.result.completion_tokens, exc)
        return response
    except ServiceUnavailable as exc:
        log.warning("request %s failed mid-stream: %s", run.id, exc)
        await send(ApiError(503, str(exc), type="server_error", code="unavailable").body())
    except Exception as exc:  # reported to the client as an error event, and logged with its traceback
        log.exception("request %s failed mid-stream", run.id)
        err = ApiError(500, f"generation failed: {exc}", type="server_error", code="internal_error")
        await send(err.body())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _tool_chunk(
    calls: tools.ToolStream, delta: Delta, chunk: Callable[..., s.ChatCompletionChunk]
) -> s.ChatCompletionChunk:
    """A chunk of a reply that may call tools: its text up to a possible call; the calls with the finish."""
    text = calls.push(delta.text)
    if delta.finish_reason is None:
        return chunk(s.ChatDelta(content=text) if text else s.ChatDelta(), None, lp=True)
    tail, found = calls.finish()
    text += tail
    out = s.ChatDelta(content=text or None, tool_calls=tools.calls_delta(found) if found else None)
    return chunk(out, "tool_calls" if found else delta.finish_reason, lp=True)


def _chat_messages(messages: list[s.ChatMessageIn]) -> list[ChatMessage]:
    """OpenAI messages as the tokenizer's (the "developer" role is a system message to the template)."""
    return [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in messages]


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return json_response(s.ModelList([s.ModelCard(service.model_name, int(time.time()))]))


async def tokenize(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    req = await _decode(request, s.TokenizeRequest)
    if (req.text is None) == (req.messages is None):
        raise ApiError(400, 'Give exactly one of "text" or "messages"', param="text")
    tokenizing = request.app[TOKENIZING_KEY]
    if req.text is not None:
        tokenizing.check_length([req.text], "text")
        return json_response(s.TokenizeResponse(await tokenizing.run(service.tokenizer.encode, req.text)))
    assert req.messages is not None
    messages = _chat_messages(req.messages)
    ids = await fields.chat_prompt(tokenizing, messages, add_generation_prompt=req.add_generation_prompt)
    return json_response(s.TokenizeResponse(ids))


async def embeddings(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    raise ApiError(
        501,
        f"Embeddings are not served: {service.model_name} is a generative model and this server computes no embeddings",
        type="invalid_request_error",
        code="not_implemented",
    )


async def health(request: web.Request) -> web.Response:
    """Readiness, as a load balancer reads it: 200 when this node can serve a request now, else 503 with the
    reason (the same body otherwise)."""
    service = request.app[SERVICE_KEY]
    body = service.health()
    reason = service.unavailable()
    if reason is None:
        return json_response(body)
    return json_response(body | {"status": "unavailable", "reason": reason}, status=503)


async def liveness(request: web.Request) -> web.Response:
    """Liveness: 200 while the process answers at all (restart it when this fails, not when /health does)."""
    return json_response({"status": "alive"})


async def trace(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    found = request.app[TRACES_KEY].get(request_id)
    if found is None:
        ring = request.app[TRACES_KEY].capacity
        raise ApiError(
            404, f"No trace for {request_id!r} (the last {ring} requests are kept)", param="id", code="trace_not_found"
        )
    return json_response(found.as_dict())


async def trace_live(request: web.Request) -> web.Response:
    """A trace's summary and events without its step records: what the web page polls during an answer."""
    request_id = request.match_info["id"]
    found = request.app[TRACES_KEY].get(request_id)
    if found is None:
        raise ApiError(404, f"No trace for {request_id!r}", param="id", code="trace_not_found")
    return json_response(found.live())


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def create_app(service: Service, config: ApiConfig) -> web.Application:
    from exo_stable.api import dialects  # the other dialects build on this module's handlers

    app = web.Application(
        middlewares=[request_context, dialects.dialect_errors, errors_and_auth], client_max_size=config.max_body_bytes
    )
    app[SERVICE_KEY] = service
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = Metrics()
    app[METRICS_KEY].register(ServiceCollector(service))
    app[METRICS_KEY].register(BatchCollector(service))
    app[TRACES_KEY] = TraceRing(config.trace_ring)
    tokenizing = app[TOKENIZING_KEY] = Tokenizing(
        service.tokenizer, service.context_length, timeout_s=config.tokenize_timeout_s
    )
    lag = app[LAG_KEY] = LoopLag()
    app[RUNNER_STATS_KEY] = {}
    app[METRICS_KEY].register(GuardCollector(lag, tokenizing, app[RUNNER_STATS_KEY]))
    app.cleanup_ctx.append(lag.context)

    async def close_pool(_: web.Application) -> None:
        tokenizing.close()

    app.on_cleanup.append(close_pool)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/tokenize", tokenize)
    app.router.add_post("/v1/embeddings", embeddings)
    dialects.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", liveness)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/traces/{id}", trace)
    app.router.add_get("/v1/traces/{id}/live", trace_live)
    add_web_routes(app)  # the chat and cluster page at / (exo_stable/web)
    return app
