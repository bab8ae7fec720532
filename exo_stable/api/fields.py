"""What the OpenAI dialect does with each request field: honour it, or refuse it with a 400 that names it.

Pure logic over the decoded request (``api/schemas.py`` declares every field OpenAI has, so a field that is
not there is refused at decoding). The same rules serve the other dialects, which build the same
:class:`SamplingParams` (``sampling_params``) and resolve the model the same way (``resolve_model``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from exo_stable.api import schemas as s
from exo_stable.api.errors import ApiError
from exo_stable.engine import grammar
from exo_stable.engine.sampling import PENALTY_WINDOW, SamplingParams
from exo_stable.engine.single import ContextOverflow
from exo_stable.pipeline.service import Service, default_seed
from exo_stable.tokenizer import ChatMessage, Tokenizer

if TYPE_CHECKING:
    from exo_stable.api.guards import Tokenizing
    from exo_stable.api.tools import ToolPlan

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

MODEL_ALIASES = ("default", "exo-stable")
"""Names that always mean the served model, for clients that need some name (beside its own names)."""


def refused(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def model_names(service: Service) -> set[str]:
    """Every name the served model answers to (case-insensitive): its own, without the file suffix and
    quantization (``SmolLM2-135M-Instruct.Q4_1.gguf`` is also ``smollm2-135m-instruct``), and the aliases."""
    name = service.model_name.lower()
    names = {name, *MODEL_ALIASES}
    stem = name.removesuffix(".gguf")
    names.add(stem)
    names.add(stem.split(".")[0])
    names.add(stem.rsplit("/", 1)[-1])
    return names


def resolve_model(requested: str | None, service: Service) -> None:
    """A request for a model this node does not serve gets OpenAI's 404 ``model_not_found``."""
    if requested is None or requested.lower() in model_names(service):
        return
    raise ApiError(
        404,
        f"The model {requested!r} does not exist here; this node serves {service.model_name!r} "
        f"(also called {', '.join(repr(a) for a in MODEL_ALIASES)})",
        param="model",
        code="model_not_found",
    )


def response_grammar(fmt: s.ResponseFormat | None) -> str:
    """The grammar a ``response_format`` asks for (empty for text): any JSON object, or JSON that validates
    against the schema (strict or not, the output is constrained to it)."""
    if fmt is None or fmt.type == "text":
        return ""
    if fmt.type == "json_object":
        return grammar.json_grammar(None)
    if fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs json_schema", param="response_format")
    try:
        return grammar.json_grammar(fmt.json_schema.schema or {"type": "object"})
    except grammar.GrammarError as exc:
        raise ApiError(400, str(exc), param="response_format.json_schema.schema", code="invalid_value") from exc


async def checked_grammar(text: str, tokenizer: Tokenizer, param: str) -> str:
    """``text`` once it compiles for this tokenizer (a 400 naming ``param`` if not); off the event loop."""
    if text:
        try:
            await asyncio.to_thread(grammar.check, text, tokenizer)
        except grammar.GrammarError as exc:
            raise ApiError(400, f"The schema cannot be enforced: {exc}", param=param, code="invalid_value") from exc
    return text


async def chat_prompt(
    tokenizing: Tokenizing,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    plan: ToolPlan | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The prompt's token ids, for every dialect: the conversation's size checked first, then rendered by the
    model's chat template off the event loop (``plan``'s messages and tools when the request uses tools); a
    conversation the template refuses is a 400."""
    tokenizing.check_length((_content(m) for m in messages), "messages")
    try:
        return await tokenizing.run(
            tokenizing.tokenizer.encode_chat,
            messages if plan is None else plan.messages,
            add_generation_prompt=add_generation_prompt,
            tools=None if plan is None else plan.template_tools,
        )
    except ValueError as exc:
        raise ApiError(400, f"Cannot build the prompt: {exc}", param="messages") from exc


def _content(message: ChatMessage | Mapping[str, Any]) -> str:
    if isinstance(message, ChatMessage):
        return message.content
    return str(message.get("content") or "")


def token_limit(service: Service, cap: int, prompt_len: int, max_tokens: int | None, param: str = "max_tokens") -> int:
    """How many tokens a request may generate: what it asked for (at most ``cap``), within the context."""
    try:
        service.check_fits(prompt_len)
    except ContextOverflow as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"{param} is capped at {cap} on this server", param=param, code="invalid_value")
    return min(max_tokens or cap, service.context_length - prompt_len)


# --- the request fields ---------------------------------------------------------------------------


def check_common(req: s._Sampling) -> None:
    """Fields chat and completions share."""
    if req.n not in (None, 1):
        raise ApiError(400, "Only n=1 is supported", param="n", code="unsupported_value")
    if req.service_tier not in (None, "auto", "default"):
        raise refused("service_tier", "this server has one tier ('auto' or 'default')")
    if req.stream_options is not None:
        if not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.stream_options.include_obfuscation:
            raise refused("stream_options.include_obfuscation", "stream chunks are not padded")


def check_chat(req: s.ChatCompletionRequest) -> None:
    check_common(req)
    unsupported: dict[str, tuple[Any, str]] = {
        "functions": (req.functions, "deprecated by OpenAI; use tools"),
        "function_call": (req.function_call, "deprecated by OpenAI; use tool_choice"),
        "audio": (req.audio, "this model produces text only"),
        "prediction": (req.prediction, "predicted outputs are not implemented"),
        "reasoning_effort": (req.reasoning_effort, "the served model does not reason"),
        "verbosity": (req.verbosity, "the served model has no verbosity control"),
        "web_search_options": (req.web_search_options, "this server does not search the web"),
        "metadata": (req.metadata or None, "metadata tags stored completions, and this server stores none"),
    }
    for name, (value, why) in unsupported.items():
        if value is not None:
            raise refused(name, why)
    if req.store:
        raise refused("store", "this server stores no completions")
    if req.modalities is not None and list(req.modalities) != ["text"]:
        raise refused("modalities", 'this model produces text only (["text"])')
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool names must be unique", param="tools")
    if req.tool_choice == "required" and not names:
        raise ApiError(400, 'tool_choice "required" needs tools', param="tool_choice")
    if isinstance(req.tool_choice, s.NamedToolChoice) and req.tool_choice.function.name not in names:
        raise ApiError(400, f"tool_choice names {req.tool_choice.function.name!r}, not in tools", param="tool_choice")
    if forced_tool(req) and req.response_format is not None and req.response_format.type != "text":
        raise refused("response_format", "a forced tool call already constrains the output")
    for i, message in enumerate(req.messages):
        check_message(message, f"messages[{i}]")


def forced_tool(req: s.ChatCompletionRequest) -> bool:
    return bool(req.tools) and (req.tool_choice == "required" or isinstance(req.tool_choice, s.NamedToolChoice))


def check_message(message: s.ChatMessageIn, where: str) -> None:
    """Only text reaches the model: any other content part is refused by its place in the request."""
    if message.tool_calls is not None and message.role != "assistant":
        raise ApiError(400, "only assistant messages carry tool_calls", param=f"{where}.tool_calls")
    if message.role == "tool" and not message.tool_call_id:
        raise ApiError(400, "a tool message needs tool_call_id", param=f"{where}.tool_call_id")
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                raise ApiError(
                    400,
                    f"{where}.content[{j}] is a {part.type!r} part; this model reads text parts only",
                    param=f"{where}.content[{j}].type",
                    code="unsupported_content",
                )
    for name, value in (
        ("name", message.name),
        ("refusal", message.refusal),
        ("function_call", message.function_call),
        ("audio", message.audio),
    ):
        if value is not None:
            why = "the chat template has no place for it" if name == "name" else "not implemented yet"
            raise refused(f"{where}.{name}", why)


def check_completion(req: s.CompletionRequest) -> None:
    check_common(req)
    if req.best_of not in (None, 1):
        raise refused("best_of", "only best_of=1 (one candidate per request)")
    if req.suffix:
        raise refused("suffix", "fill-in-the-middle is not implemented")


# --- sampling --------------------------------------------------------------------------------------


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted pairs; a key that is not a token id of this model is a 400."""
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise ApiError(
                400,
                f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                param="logit_bias",
                code="invalid_value",
            )
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def sampling_params(
    req: s._Sampling, *, prompt: Sequence[int], vocab_size: int, logprobs: int | None, grammar: str = ""
) -> SamplingParams:
    """The request's sampler: OpenAI's defaults (temperature 1), a fresh seed unless one is given."""
    return build_params(
        prompt,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=logit_bias(req.logit_bias, vocab_size),
        logprobs=logprobs,
        grammar=grammar,
    )


def build_params(prompt: Sequence[int], *, seed: int | None, **controls: Any) -> SamplingParams:
    """A :class:`SamplingParams` (a fresh seed unless one is given; the prompt's tail when a penalty is on);
    a value the sampler refuses is a 400."""
    try:
        params = SamplingParams(seed=default_seed() if seed is None else seed % 2**64, **controls)
    except ValueError as exc:
        raise ApiError(400, f"Invalid sampling parameters: {exc}", code="invalid_value") from exc
    if params.penalized:
        params = msgspec.structs.replace(params, prompt_tail=tuple(prompt[-PENALTY_WINDOW:]))
    return params
