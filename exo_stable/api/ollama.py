"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``) over the same service.

A thin layer with Ollama's conventions: streaming is the default and is newline-delimited JSON, sampling
options live under ``options`` (with Ollama's defaults: temperature 0.8, top-k 40, top-p 0.9, repeat penalty
1.1 over the last 64 tokens), ``num_predict`` bounds the reply, and errors are ``{"error": "..."}``. Options
and fields this server cannot honour are refused by name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from exo_stable.api import fields, tools
from exo_stable.api import schemas as s
from exo_stable.api import server as core
from exo_stable.api.errors import ApiError
from exo_stable.engine import grammar
from exo_stable.engine.sampling import PENALTY_WINDOW
from exo_stable.pipeline.service import GenerationJob, Service, ServiceUnavailable
from exo_stable.tokenizer import ChatMessage

log = logging.getLogger(__name__)


class Options(Struct, kw_only=True, forbid_unknown_fields=True):
    """Ollama's runtime options: those this server honours, and the others (refused when given)."""

    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 0.8
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.9
    top_k: Annotated[int, Meta(ge=0)] = 40
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: int | None = None
    num_predict: int | None = None
    stop: Annotated[list[str], Meta(max_length=16)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.1
    repeat_last_n: int = PENALTY_WINDOW
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    num_ctx: int | None = None
    num_keep: Any = None
    typical_p: Any = None
    tfs_z: Any = None
    mirostat: Any = None
    mirostat_tau: Any = None
    mirostat_eta: Any = None
    penalize_newline: Any = None
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    use_mmap: Any = None
    num_thread: Any = None


_UNSUPPORTED_OPTIONS = [
    "num_keep",
    "typical_p",
    "tfs_z",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
    "numa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
]


class OllamaMessage(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: Any = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaFunction(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class OllamaCall(Struct, kw_only=True):
    function: OllamaFunction


class _Common(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    stream: bool = True
    options: Options | None = None
    format: Any = None
    keep_alive: Any = None
    think: Any = None


class ChatRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: list[OllamaMessage]
    tools: Any = None


class GenerateRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: Any = None
    images: list[str] | None = None


class ShowRequest(Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool = False


def _model(name: str, service: Service) -> None:
    fields.resolve_model(name.removesuffix(":latest"), service)


def _check(req: _Common, options: Options) -> None:
    if req.think:
        raise fields.refused("think", "the served model does not think")
    for name in _UNSUPPORTED_OPTIONS:
        if getattr(options, name) is not None:
            raise fields.refused(f"options.{name}", "not implemented by this server's sampler")
    if options.repeat_last_n != PENALTY_WINDOW:
        raise fields.refused("options.repeat_last_n", f"the penalties look back over {PENALTY_WINDOW} tokens")


def _format_grammar(fmt: Any) -> str:
    """Ollama's ``format``: ``"json"`` (any JSON object) or a JSON schema."""
    if fmt is None or fmt == "":
        return ""
    if fmt == "json":
        return grammar.json_grammar(None)
    if isinstance(fmt, dict):
        try:
            return grammar.json_grammar(fmt)
        except grammar.GrammarError as exc:
            raise ApiError(400, str(exc), param="format") from exc
    raise ApiError(400, 'format must be "json" or a JSON schema', param="format")


def _chat(req: ChatRequest, template: str | None) -> tuple[list[dict[str, Any]], tools.ToolPlan | None]:
    """The conversation, OpenAI-shaped (Ollama's calls carry arguments as objects, results a tool_name), and
    how it uses the request's tools."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        if m.images:
            raise fields.refused(f"messages[{i}].images", "this model reads text only")
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            try:
                calls = msgspec.convert(m.tool_calls, list[OllamaCall])
            except msgspec.ValidationError as exc:
                raise ApiError(400, f"Invalid tool_calls: {exc}", param=f"messages[{i}].tool_calls") from exc
            message["tool_calls"] = [
                {
                    "id": f"call_{i}_{j}",
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)},
                }
                for j, c in enumerate(calls)
            ]
        if m.role == "tool":
            message["tool_call_id"] = m.tool_name or ""
        out.append(message)
    try:
        defs = msgspec.convert(req.tools or [], list[s.Tool])
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid tools: {exc}", param="tools") from exc
    return out, tools.plan_from(out, [msgspec.to_builtins(t) for t in defs], "auto", template)


def _generate_prompt(req: GenerateRequest, service: Service) -> list[int]:
    for name, value, why in (
        ("images", req.images, "this model reads text only"),
        ("suffix", req.suffix, "fill-in-the-middle is not implemented"),
        ("template", req.template, "the model's own chat template is used"),
        ("context", req.context, "deprecated by Ollama; send the conversation to /api/chat"),
    ):
        if value:
            raise fields.refused(name, why)
    if req.raw:
        if req.system:
            raise fields.refused("system", "a raw prompt is not templated")
        return service.tokenizer.encode(req.prompt)
    messages = [ChatMessage("system", req.system)] if req.system else []
    return service.tokenizer.encode_chat([*messages, ChatMessage("user", req.prompt)])


async def chat(request: web.Request) -> web.StreamResponse:
    req = await core._decode(request, ChatRequest)
    service = request.app[core.SERVICE_KEY]
    _model(req.model, service)
    messages, plan = _chat(req, service.tokenizer.chat_template)
    prompt = await fields.chat_prompt(request.app[core.TOKENIZING_KEY], messages, plan)
    calls = tools.ToolStream(frozenset() if plan is None else plan.names)

    def body(text: str, done: bool) -> dict[str, Any]:
        if not calls.names:
            return {"message": {"role": "assistant", "content": text}}
        shown = calls.push(text)
        if not done:
            return {"message": {"role": "assistant", "content": shown}}
        tail, found = calls.finish()
        message: dict[str, Any] = {"role": "assistant", "content": shown + tail}
        if found:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in found
            ]
        return {"message": message}

    return await _run(request, req, prompt, body)


async def generate(request: web.Request) -> web.StreamResponse:
    req = await core._decode(request, GenerateRequest)
    service = request.app[core.SERVICE_KEY]
    _model(req.model, service)
    tokenizing = request.app[core.TOKENIZING_KEY]
    tokenizing.check_length([req.prompt, req.system or ""], "prompt")
    try:
        prompt = await tokenizing.run(_generate_prompt, req, service)
    except ValueError as exc:
        raise ApiError(400, f"Cannot build the prompt: {exc}", param="prompt") from exc
    if not prompt:  # Ollama loads the model on an empty prompt: it is always loaded here
        return core.json_response({**_stamp(service), "response": "", "done": True, "done_reason": "load"})
    return await _run(request, req, prompt, lambda text, done: {"response": text})


def _stamp(service: Service) -> dict[str, Any]:
    return {"model": service.model_name, "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}


async def _run(
    request: web.Request, req: _Common, prompt: list[int], body: Callable[[str, bool], dict[str, Any]]
) -> web.StreamResponse:
    service, config = request.app[core.SERVICE_KEY], request.app[core.CONFIG_KEY]
    options = req.options or Options()
    _check(req, options)
    max_tokens = None if options.num_predict is None or options.num_predict < 0 else options.num_predict
    if max_tokens == 0:
        raise ApiError(400, "num_predict must not be 0", param="options.num_predict")
    limit = fields.token_limit(service, config.max_tokens_cap, len(prompt), max_tokens, "options.num_predict")
    if options.num_ctx is not None:
        if len(prompt) >= options.num_ctx:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; num_ctx is {options.num_ctx}", param="num_ctx")
        limit = min(limit, options.num_ctx - len(prompt))
    params = fields.build_params(
        prompt,
        grammar=await fields.checked_grammar(_format_grammar(req.format), service.tokenizer, "format"),
        seed=options.seed,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        repetition_penalty=options.repeat_penalty,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
    )
    run = core._Run(request, GenerationJob(prompt, params, limit, options.stop or []), "ollama")
    started = time.perf_counter_ns()

    def final(text: str) -> dict[str, Any]:
        r = run.result
        elapsed = time.perf_counter_ns() - started
        first = int((r.first_token_s or 0.0) * 1e9)
        return {
            **_stamp(service),
            **body(text, True),
            "done": True,
            "done_reason": r.finish_reason,
            "total_duration": elapsed,
            "load_duration": 0,
            "prompt_eval_count": r.prompt_tokens,
            "prompt_eval_duration": first,
            "eval_count": r.completion_tokens,
            "eval_duration": max(0, elapsed - first),
        }

    await core._admitted(service, request)
    try:
        if not req.stream:
            return core.json_response(final("".join([d.text async for d in core._collect(run, request)])))
        return await _ndjson(request, run, lambda text: {**_stamp(service), **body(text, False), "done": False}, final)
    finally:
        service.release()


async def _ndjson(
    request: web.Request,
    run: core._Run,
    part: Callable[[str], dict[str, Any]],
    final: Callable[[str], dict[str, Any]],
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def send(obj: dict[str, Any]) -> None:
        await response.write(msgspec.json.encode(obj) + b"\n")

    try:
        async with aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                if delta.text and delta.finish_reason is None:
                    await send(part(delta.text))
                elif delta.finish_reason is not None:
                    await send(final(delta.text))
    except (ConnectionResetError, ConnectionError):
        return response
    except (ServiceUnavailable, TimeoutError) as exc:
        log.warning("request %s failed mid-stream: %s", run.id, exc)
        await send({"error": str(exc)})
    except Exception as exc:  # reported to the client as an error line, and logged with its traceback
        log.exception("request %s failed mid-stream", run.id)
        await send({"error": f"generation failed: {exc}"})
    await response.write_eof()
    return response


def _details(service: Service) -> dict[str, Any]:
    name = service.model_name
    quant = name.removesuffix(".gguf").rsplit(".", 1)[-1] if name.endswith(".gguf") and "." in name[:-5] else ""
    return {
        "parent_model": "",
        "format": "gguf" if name.endswith(".gguf") else "mlx",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "",
        "quantization_level": quant or service.dtype,
    }


async def tags(request: web.Request) -> web.Response:
    service = request.app[core.SERVICE_KEY]
    model = {
        "name": service.model_name,
        "model": service.model_name,
        "modified_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "size": 0,
        "digest": "",
        "details": _details(service),
    }
    return core.json_response({"models": [model]})


async def show(request: web.Request) -> web.Response:
    service = request.app[core.SERVICE_KEY]
    req = await core._decode(request, ShowRequest)
    name = req.model or req.name
    if name is None:
        raise ApiError(400, "model is required", param="model")
    _model(name, service)
    return core.json_response(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": _details(service),
            "model_info": {"general.architecture": "llama", "llama.context_length": service.context_length},
            "capabilities": ["completion"],
            "modified_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
    )


def error_body(error: ApiError) -> dict[str, Any]:
    """Ollama's error object: ``{"error": message}``."""
    message = f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
    return {"error": message}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
