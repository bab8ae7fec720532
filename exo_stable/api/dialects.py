"""The API's other dialects (Anthropic's Messages, Ollama's) on the OpenAI dialect's app: their routes, and
their errors in their own shapes.

Every error leaves ``errors_and_auth`` (``api/server.py``) as an OpenAI error object, whatever raised it (the
auth check, the body limit, a handler). :func:`dialect_errors` sits outside it and re-shapes the errors of
the other dialects' routes, so the same checks answer each client in the shape its library parses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from exo_stable.api import anthropic, ollama
from exo_stable.api.errors import ApiError
from exo_stable.api.schemas import ErrorResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PREFIXES = ("/v1/messages", "/api/")
"""Paths of the other dialects (the auth middleware guards them as it guards ``/v1/``)."""


def _shape(path: str) -> Callable[[ApiError], dict[str, Any]] | None:
    if path.startswith("/v1/messages"):
        return anthropic.error_body
    if path.startswith("/api/"):
        return ollama.error_body
    return None


@web.middleware
async def dialect_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    shape = _shape(request.path)
    if shape is None or response.status < 400 or not isinstance(response, web.Response):
        return response
    raw = response.body
    if not isinstance(raw, bytes):
        return response
    try:
        error = msgspec.json.decode(raw, type=ErrorResponse).error
    except msgspec.DecodeError:
        return response
    api_error = ApiError(response.status, error.message, type=error.type, param=error.param, code=error.code)
    return web.Response(
        body=msgspec.json.encode(shape(api_error)), status=response.status, content_type="application/json"
    )


def add_routes(app: web.Application) -> None:
    anthropic.add_routes(app)
    ollama.add_routes(app)
