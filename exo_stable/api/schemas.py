"""OpenAI-compatible request and response bodies as msgspec Structs.

Requests are decoded straight into these types: a wrong type or an out-of-range value becomes a 400 with
the offending field named. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
StopList = Annotated[list[str], Meta(max_length=16)]


class TextPart(Struct, kw_only=True):
    type: str = "text"
    text: str = ""


class ChatMessageIn(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(Struct, kw_only=True):
    model: str | None = None
    stream: bool = False
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    seed: int | None = None
    stop: str | StopList | None = None
    n: int | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    exo_replay: Literal["exact", "fast"] | None = None
    """Extension: how a recovery rebuilds this request's caches (default: the node's ``--replay``)."""
    exo_validation: Literal["off", "light", "strict"] | None = None
    """Extension: this request's validation level (default: the node's ``--validation``); see the README."""
    exo_trace: bool = False
    """Extension: add the request's trace summary to the response (``exo_trace``: the last stream chunk)."""

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | int]  # msgspec allows one array-like type per union
    echo: bool = False


class TokenizeRequest(Struct, kw_only=True):
    text: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_generation_prompt: bool = True


# --- responses ------------------------------------------------------------------------------------


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "exo-stable"
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    ids: list[int]


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorBody


encoder = msgspec.json.Encoder()
