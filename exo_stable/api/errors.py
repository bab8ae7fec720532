"""OpenAI-style errors: every failure the API reports is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import re

import msgspec

from exo_stable.api.schemas import ErrorBody, ErrorResponse

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


class ApiError(Exception):
    """An error that becomes an HTTP response with an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    @classmethod
    def from_decode_error(cls, exc: msgspec.DecodeError) -> ApiError:
        """A 400 naming the offending field, from msgspec's message (e.g. "... - at `$.max_tokens`")."""
        message = str(exc)
        match = _PATH.search(message)
        param = match.group(1) if match and match.group(1) else None
        unknown = _UNKNOWN.search(message)
        if isinstance(exc, msgspec.ValidationError) and unknown:
            # A field this API does not have: refused by name rather than ignored.
            name = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
            return cls(400, f"Unsupported field {name!r}: {message}", param=name, code="unsupported_parameter")
        if isinstance(exc, msgspec.ValidationError):
            return cls(400, f"Invalid request: {message}", param=param, code="invalid_value")
        return cls(400, f"Malformed JSON body: {message}", code="invalid_json")


def error_json(error: ApiError) -> bytes:
    return msgspec.json.encode(error.body())
