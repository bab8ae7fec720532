"""Anthropic's Messages API (``POST /v1/messages``) over the same service, validation, limits and auth.

A thin layer: the request's ``system`` and ``messages`` go through the model's chat template as the OpenAI
dialect's do, the sampler is the same, and the reply comes back as a ``message`` or as Anthropic's stream of
events (``message_start``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``, ``message_stop``).
Errors (raised anywhere, the auth middleware's included) leave as ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from exo_stable.api import fields, tools
from exo_stable.api import server as core
from exo_stable.api.errors import ApiError
from exo_stable.engine import grammar
from exo_stable.pipeline.service import GenerationJob, ServiceUnavailable

log = logging.getLogger(__name__)


class Block(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    source: Any = None
    cache_control: Any = None
    citations: Any = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: Any = None
    is_error: bool | None = None


class Message(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")]
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: Any = None


class ToolChoice(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str | None = None


class MessagesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)]
    system: str | list[Block] | None = None
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: Metadata | None = None
    tools: Annotated[list[ToolDef], Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Any = None
    service_tier: str | None = None
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None
    cache_control: Any = None  # a prompt-caching hint: nothing is cached across requests here, so it changes nothing
    output_config: Any = None
    speed: Any = None
    inference_geo: Any = None
    diagnostics: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None


def _text(content: str | list[Block], where: str) -> str:
    """Text blocks only (``cache_control`` is a caching hint, honoured trivially: nothing is cached across
    requests); any other block is refused by its place in the request."""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise ApiError(
                400,
                f"{where}[{j}] is a {block.type!r} block; this server reads text blocks only",
                param=f"{where}[{j}].type",
                code="unsupported_content",
            )
        if block.citations is not None:
            raise fields.refused(f"{where}[{j}].citations", "citations are not implemented")
        parts.append(block.text)
    return "".join(parts)


def _check(req: MessagesRequest) -> None:
    for name, value, why in (
        ("container", req.container, "no code execution here"),
        ("mcp_servers", req.mcp_servers, "no MCP connector here"),
        ("context_management", req.context_management, "not implemented"),
        ("speed", req.speed, "this server has one speed"),
        ("inference_geo", req.inference_geo, "inference runs where this node is"),
        ("diagnostics", req.diagnostics, "not implemented"),
        ("user_profile_id", req.user_profile_id, "no user profiles here"),
        ("workspace_id", req.workspace_id, "no workspaces here"),
    ):
        if value is not None:
            raise fields.refused(name, why)
    if req.thinking is not None and not (isinstance(req.thinking, dict) and req.thinking.get("type") == "disabled"):
        raise fields.refused("thinking", "the served model does not think")
    choice = req.tool_choice
    if choice is not None and choice.type == "tool" and choice.name not in {t.name for t in req.tools or []}:
        raise ApiError(400, "tool_choice must name one of the tools", param="tool_choice")
    if choice is not None and choice.type in ("any", "tool") and not req.tools:
        raise ApiError(400, f"tool_choice {choice.type!r} needs tools", param="tool_choice")
    if req.service_tier not in (None, "auto", "standard_only"):
        raise fields.refused("service_tier", "this server has one tier")


def _output_grammar(config: Any) -> str:
    """``output_config.format`` ``{"type": "json_schema", "schema": ...}``: the reply is JSON valid against it."""
    if config is None:
        return ""
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(config, dict) or set(config) - {"format"}:
        raise fields.refused("output_config", "only output_config.format is served")
    if fmt is None:
        return ""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(
            400, 'output_config.format must be {"type": "json_schema", "schema": {...}}', param="output_config"
        )
    try:
        return grammar.json_grammar(fmt["schema"])
    except grammar.GrammarError as exc:
        raise ApiError(400, str(exc), param="output_config.format.schema") from exc


def _messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation, OpenAI-shaped: ``tool_use`` blocks become an assistant's ``tool_calls``, and
    ``tool_result`` blocks ``tool`` messages; every other block must be text."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        out.append({"role": "system", "content": _text(req.system, "system")})
    for i, message in enumerate(req.messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[Block] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if block.type == "tool_use" and message.role == "assistant" and block.name:
                arguments = json.dumps(block.input if block.input is not None else {}, ensure_ascii=False)
                calls.append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
                )
            elif block.type == "tool_result" and message.role == "user" and block.tool_use_id:
                result = (
                    block.content
                    if isinstance(block.content, str)
                    else _text(msgspec.convert(block.content or [], list[Block]), f"{where}[{j}].content")
                )
                prefix = "Error: " if block.is_error else ""
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": prefix + result})
            else:
                texts.append(block)
        if texts or not calls:
            out.append({"role": message.role, "content": _text(texts, where)})
        if calls:
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = calls
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
    return out


def _plan(req: MessagesRequest, messages: list[dict[str, Any]], template: str | None) -> tools.ToolPlan | None:
    defs = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
        }
        for t in req.tools or []
    ]
    kind = "auto" if req.tool_choice is None else req.tool_choice.type
    named = None if req.tool_choice is None else req.tool_choice.name
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind, named)
    return tools.plan_from(messages, defs, choice, template)


def _tool_use(call: tools.ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{call.id.removeprefix('call_')}",
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def _stop_reason(reason: str | None, tokens: list[int], stops: list[str], tokenizer: Any) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` from the finish reason and the tokens."""
    if reason == "length":
        return "max_tokens", None
    if tokens and tokens[-1] in tokenizer.eos_ids:
        return "end_turn", None
    text = tokenizer.decode(tokens)
    found = [(text.find(s), s) for s in stops if s and s in text]
    return ("stop_sequence", min(found)[1]) if found else ("end_turn", None)


async def messages(request: web.Request) -> web.StreamResponse:
    service, config = request.app[core.SERVICE_KEY], request.app[core.CONFIG_KEY]
    req = await core._decode(request, MessagesRequest)
    fields.resolve_model(req.model, service)
    _check(req)
    conversation = _messages(req)
    plan = _plan(req, conversation, service.tokenizer.chat_template)
    prompt = await fields.chat_prompt(request.app[core.TOKENIZING_KEY], conversation, plan)
    if plan is not None and plan.grammar and req.output_config is not None:
        raise fields.refused("output_config", "a forced tool call already constrains the output")
    forced = "" if plan is None else plan.grammar
    limit = fields.token_limit(service, config.max_tokens_cap, len(prompt), req.max_tokens)
    params = fields.build_params(
        prompt,
        grammar=await fields.checked_grammar(
            forced or _output_grammar(req.output_config), service.tokenizer, "output_config"
        ),
        seed=None,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
    )
    stops = list(req.stop_sequences or [])
    run = core._Run(request, GenerationJob(prompt, params, limit, stops), "msg")
    msg_id = f"msg_{run.id}"

    def usage() -> dict[str, int]:
        return {"input_tokens": run.result.prompt_tokens, "output_tokens": run.result.completion_tokens}

    names = frozenset() if plan is None else plan.names
    calls = tools.ToolStream(names)

    def stop() -> tuple[str, str | None]:
        r = run.result
        return _stop_reason(r.finish_reason, r.token_ids, stops, service.tokenizer)

    def message(content: list[dict[str, Any]], reason: str | None, sequence: str | None) -> dict[str, Any]:
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": service.model_name,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(),
        }

    await core._admitted(service, request)
    try:
        if not req.stream:
            text = "".join([d.text async for d in core._collect(run, request)])
            content, found = tools.parse(text, names) if names else (text, [])
            blocks = ([{"type": "text", "text": content}] if content or not found else []) + [
                _tool_use(c) for c in found
            ]
            return core.json_response(message(blocks, *(("tool_use", None) if found else stop())))
        return await _events(request, run, message, stop, usage, calls=calls)
    finally:
        service.release()


async def _events(
    request: web.Request,
    run: core._Run,
    message: Callable[[list[dict[str, Any]], str | None, str | None], dict[str, Any]],
    stop: Callable[[], tuple[str, str | None]],
    usage: Callable[[], dict[str, int]],
    *,
    calls: tools.ToolStream,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(event: str, data: dict[str, Any]) -> None:
        await response.write(f"event: {event}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n")

    try:
        await send("message_start", {"type": "message_start", "message": message([], None, None)})
        await send(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        found: list[tools.ToolCall] = []
        async with aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                text = calls.push(delta.text) if calls.names else delta.text
                if delta.finish_reason is not None and calls.names:
                    tail, found = calls.finish()
                    text += tail
                if text:
                    block = {"type": "text_delta", "text": text}
                    await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": block})
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        for index, call in enumerate(found, start=1):
            use = _tool_use(call)
            start = {**use, "input": {}}
            await send("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
            partial = {"type": "input_json_delta", "partial_json": json.dumps(use["input"], ensure_ascii=False)}
            await send("content_block_delta", {"type": "content_block_delta", "index": index, "delta": partial})
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        reason, sequence = ("tool_use", None) if found else stop()
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": usage()["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
    except (ConnectionResetError, ConnectionError):
        return response  # the client went away: closing the iterator freed the request's caches
    except (ServiceUnavailable, TimeoutError) as exc:
        log.warning("request %s failed mid-stream: %s", run.id, exc)
        await send("error", error_body(ApiError(503, str(exc), type="server_error", code="unavailable")))
    except Exception as exc:  # reported to the client as an error event, and logged with its traceback
        log.exception("request %s failed mid-stream", run.id)
        await send("error", error_body(ApiError(500, f"generation failed: {exc}", type="server_error")))
    await response.write_eof()
    return response


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_TYPES |= {413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(error: ApiError) -> dict[str, Any]:
    """Anthropic's error object for an error of any dialect."""
    kind = _TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    message = f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
    return {"type": "error", "error": {"type": kind, "message": message}}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
