"""Chat templates: the model's Jinja template rendered as Hugging Face's ``apply_chat_template`` renders it.

Messages are mappings (or :class:`ChatMessage`) with a role and a content that is a string, a list of text
parts (``{"type": "text", "text": ...}``: kept for templates that read parts, else joined as mlx-lm does),
or absent on an assistant message that carries ``tool_calls``. Other keys (``tool_calls``, ``tool_call_id``,
``name``, ``reasoning_content``) pass through to the template, reasoning under the three names templates use.
The template sees ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``documents`` (None) and, when given, ``enable_thinking``.

:func:`render_with_content_spans` also says where each message's content lies in the rendered text, so that
special-token text typed by a user stays plain text (see :meth:`Tokenizer.encode_chat`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox

__all__ = [
    "CHAT_ROLES",
    "ChatMessage",
    "check_no_special_text",
    "compile_template",
    "content_texts",
    "normalize_messages",
    "reads_content_parts",
    "render_with_content_spans",
]

#: Roles accepted in chat messages.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message: a role (system, user, assistant or tool) and its text."""

    role: str
    content: str


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way Hugging Face ``apply_chat_template`` does (sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _content(index: int, content: Any, has_tool_calls: bool, typed: bool) -> str | list[dict[str, str]] | None:
    if isinstance(content, str):
        return content
    if content is None and has_tool_calls:
        return None
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"message {index} content part {part!r:.80} is not a text part")
            texts.append(part["text"])
        return [{"type": "text", "text": t} for t in texts] if typed else "".join(texts)
    raise ValueError(
        f"message {index} content must be a string or a list of text parts, found {type(content).__name__}"
    )


def normalize_messages(
    messages: Sequence[ChatMessage | Mapping[str, Any]], *, typed_content: bool = False
) -> list[dict[str, Any]]:
    """Messages as the template sees them: plain dicts; other keys than role and content pass through.

    A list of text parts stays a list when the template reads content parts (``typed_content``), as
    ``transformers`` hands it over; otherwise its texts are joined into one string, as mlx-lm does.
    """
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            fields: dict[str, Any] = {"role": message.role, "content": message.content}
        elif isinstance(message, Mapping):
            fields = dict(message)
        else:
            raise ValueError(f"message {index} is neither a ChatMessage nor a mapping: {type(message).__name__}")
        role = fields.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {sorted(CHAT_ROLES)}")
        fields["content"] = _content(index, fields.get("content"), bool(fields.get("tool_calls")), typed_content)
        reasoning = next((fields[k] for k in _REASONING_FIELDS if fields.get(k) is not None), None)
        if reasoning is not None:  # templates read it under one of several names, as in transformers
            fields = {"thinking": reasoning, **fields, "reasoning_content": reasoning}
        out.append(fields)
    return out


def reads_content_parts(render: Callable[[list[dict[str, Any]]], str]) -> bool:
    """Whether a template renders a content given as a list of text parts (Gemma's, Llama 4's, ...).

    Probed the way llama.cpp probes templates: a needle in a one-part list must come out as plain text, not
    inside the list's repr.
    """
    needle = f"needle{secrets.token_hex(6)}"
    try:
        text = render([{"role": "user", "content": [{"type": "text", "text": needle}]}])
    except Exception:  # a template that rejects the probe does not read parts: its error is not ours
        return False
    return needle in text and "'type'" not in text


def content_texts(content: Any) -> list[str]:
    """The texts of a normalized content (a string, text parts, or None)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content]
    return []


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def check_no_special_text(messages: Sequence[Mapping[str, Any]], tools: Any, specials: Sequence[str]) -> None:
    """Refuse special-token text outside message content (tool definitions, tool calls, names).

    Content is kept plain by position; other fields are rendered by the template in ways that cannot be
    located reliably, so control-token text there is an error rather than a way to inject control tokens.
    """
    others = [{k: v for k, v in m.items() if k != "content"} for m in messages]
    for text in _strings([others, tools]):
        for special in specials:
            if special in text:
                raise ValueError(f"special-token text {special!r} is not allowed in tools, tool calls or names")


def render_with_content_spans(
    render: Callable[[list[dict[str, Any]]], str],
    messages: list[dict[str, Any]],
    specials: Sequence[str],
) -> tuple[str, list[tuple[int, int]]]:
    """Render the prompt and locate the message contents in it.

    Contents are rendered wrapped in unguessable markers; the markers are then removed and their positions
    recorded. If the template transforms the content so that the marked rendering differs from the plain
    one, the contents are looked up in the plain rendering instead; content that holds special-token text
    but cannot be located is an error (it could otherwise inject control tokens).
    """
    plain = render(messages)
    nonce = secrets.token_hex(8)
    open_m, close_m = f"\U000f0000{nonce}\U000f0001", f"\U000f0002{nonce}\U000f0003"

    def mark(content: Any) -> Any:
        if isinstance(content, str):
            return f"{open_m}{content}{close_m}"
        if isinstance(content, list):
            return [{**part, "text": f"{open_m}{part['text']}{close_m}"} for part in content]
        return content

    marked_msgs = [{**m, "content": mark(m["content"])} for m in messages]
    marked = render(marked_msgs)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    pos = 0
    ok = True
    while True:
        o = marked.find(open_m, pos)
        if o < 0:
            tail = marked[pos:]
            ok = ok and close_m not in tail
            parts.append(tail)
            break
        c = marked.find(close_m, o + len(open_m))
        if c < 0:
            ok = False
            break
        head, body = marked[pos:o], marked[o + len(open_m) : c]
        if open_m in body or close_m in head:
            ok = False
            break
        parts.append(head)
        parts.append(body)
        length += len(head)
        spans.append((length, length + len(body)))
        length += len(body)
        pos = c + len(close_m)
    if ok and "".join(parts) == plain:
        return plain, [s for s in spans if s[1] > s[0]]

    # Fallback: find each content in order in the plain rendering.
    spans = []
    pos = 0
    for content in (text for m in messages for text in content_texts(m["content"])):
        found = False
        for candidate in dict.fromkeys((content, content.strip())):
            hit = plain.find(candidate, pos) if candidate else -1
            if hit >= 0:
                spans.append((hit, hit + len(candidate)))
                pos = hit + len(candidate)
                found = True
                break
        if not found and any(tok in content for tok in specials):
            raise ValueError(
                "the chat template transforms message content that contains special-token text; "
                "cannot keep it as plain text"
            )
    return plain, spans
