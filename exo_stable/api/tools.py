"""Tool calls: OpenAI-style tools rendered into the model's chat template, and the model's calls parsed back.

Pure logic. A template that reads ``tools`` gets them (and assistant ``tool_calls`` and ``tool`` messages)
as Hugging Face's ``apply_chat_template`` hands them over; a template that does not (the default model's)
gets them the Hermes way, which small instruct models follow: the definitions in the system message, calls
as ``<tool_call>{json}</tool_call>``, results as ``<tool_response>`` in a user turn. The model's output is
parsed in any of the formats the families use: Hermes/Qwen ``<tool_call>``, Mistral ``[TOOL_CALLS] [...]``,
Llama 3.x ``<|python_tag|>`` or a bare ``{"name", "parameters"}`` object. A forced call (``required`` or a
named function) is constrained by a grammar to exactly one well-formed call of a declared tool.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from exo_stable.api import schemas as s
from exo_stable.engine import grammar

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, MISTRAL, PYTHON_TAG)

SYSTEM_PROMPT = (
    "You may call functions to help with the user's request. The functions are described in JSON within "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, answer with a JSON object holding its "
    'name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function name>, '
    '"arguments": <arguments object>}}\n</tool_call>'
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def reads_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def prompt_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (OpenAI's, as mappings) and tools as the template gets them: its own way when it reads
    ``tools``, else the Hermes way in plain text."""
    if reads_tools(template):
        out = []
        for m in messages:
            message = dict(m)
            if m.get("tool_calls"):
                message["tool_calls"] = [
                    {"type": "function", "id": c.get("id"), "function": _with_args(c["function"])}
                    for c in m["tool_calls"]
                ]
            out.append(message)
        return out, [dict(t) for t in tools] if tools else None
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(
                f"{HERMES_OPEN}\n{json.dumps(_with_args(c['function']), ensure_ascii=False)}\n{HERMES_CLOSE}"
                for c in m["tool_calls"]
            )
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = SYSTEM_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _with_args(function: Mapping[str, Any]) -> dict[str, Any]:
    """A call's function with its arguments as an object (templates and Hermes text read them so)."""
    raw = function.get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        arguments = raw
    return {"name": function["name"], "arguments": arguments}


def forced_grammar(tools: Sequence[Mapping[str, Any]], name: str | None, template: str | None) -> str:
    """A grammar allowing exactly one call (of ``name``, or of any tool) in the format the model is prompted
    for: ``<tool_call>`` around the call's JSON (Hermes), or the bare JSON for templates of other formats."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    key = "parameters" if template is not None and PYTHON_TAG in template else "arguments"
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                key: t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = json.dumps(schema)
    if template is not None and reads_tools(template) and HERMES_OPEN not in template:
        return grammar.lark_grammar(f"start: json_call\njson_call: %json {body}\n")
    return grammar.lark_grammar(
        f'start: "{HERMES_OPEN}" "\\n" json_call "\\n" "{HERMES_CLOSE}"\njson_call: %json {body}\n'
    )


def _call(obj: Any, names: frozenset[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], text)


def _json_values(text: str) -> list[Any]:
    """Every JSON value in ``text``, one after another (whitespace, commas or semicolons between)."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
        if pos >= len(text):
            break
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)
    return values


def parse(text: str, names: frozenset[str]) -> tuple[str | None, list[ToolCall]]:
    """Split a reply into its text and the tool calls it makes (none when it makes none it can)."""
    try:
        if HERMES_OPEN in text:
            head = text[: text.index(HERMES_OPEN)]
            blocks = re.findall(rf"{re.escape(HERMES_OPEN)}(.*?)(?:{re.escape(HERMES_CLOSE)}|$)", text, re.DOTALL)
            values = [v for block in blocks for v in _json_values(block.strip())]
        elif MISTRAL in text:
            head, _, tail = text.partition(MISTRAL)
            found = _json_values(tail.strip())
            values = [v for value in found for v in (value if isinstance(value, list) else [value])]
        elif PYTHON_TAG in text:
            head, _, tail = text.partition(PYTHON_TAG)
            values = _json_values(tail.strip())
        elif text.lstrip().startswith("{"):
            head, values = "", _json_values(text.strip())
        else:
            return text, []
    except json.JSONDecodeError:
        return text, []
    calls = [c for v in values if (c := _call(v, names)) is not None]
    if not calls or len(calls) != len(values):
        return text, []
    return (head.strip() or None), calls


class ToolStream:
    """Streams a reply's text while holding back whatever may be a tool call, to parse it at the end."""

    def __init__(self, names: frozenset[str], *, single: bool = False) -> None:
        """``single``: keep only the first call (``parallel_tool_calls: false``)."""
        self.names = names
        self.single = single
        self.text = ""
        self.sent = 0

    def _call_at(self) -> int | None:
        """Where a call may begin: a marker, or a bare JSON object opening the reply."""
        if self.text.lstrip().startswith("{"):
            return 0
        found = [i for m in MARKERS if (i := self.text.find(m)) >= 0]
        return min(found) if found else None

    def push(self, text: str) -> str:
        """Text safe to send now: none from where a call may begin, nor a tail that may begin a marker."""
        self.text += text
        at = self._call_at()
        if at is not None:
            cut = at
        elif not self.text.strip():
            cut = 0  # leading whitespace may come before a bare JSON call
        else:
            cut = len(self.text) - _partial_marker(self.text)
        out = self.text[self.sent : max(cut, self.sent)]
        self.sent = max(cut, self.sent)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text not sent yet (before the calls, when there are calls) and the calls."""
        _, calls = parse(self.text, self.names)
        at = self._call_at()
        if calls and at is not None:
            return self.text[self.sent : max(at, self.sent)], calls[:1] if self.single else calls
        return self.text[self.sent :], []


def _partial_marker(text: str) -> int:
    """Length of the longest suffix of ``text`` that begins some marker."""
    best = 0
    for marker in MARKERS:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request uses tools: its messages and tools for the template, the grammar of a forced
    call (or empty), and the names a parsed call may have."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    grammar: str
    names: frozenset[str]


def plan(req: s.ChatCompletionRequest, template: str | None) -> ToolPlan | None:
    """None when neither tools nor earlier calls are in the request. With ``tool_choice: "none"`` the earlier
    calls and results are rendered but no tool is offered (``names`` is empty: nothing is parsed)."""
    messages = []
    for m in req.messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [msgspec.to_builtins(c) for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    choice = req.tool_choice
    name = choice.function.name if isinstance(choice, s.NamedToolChoice) else choice
    defs = [msgspec.to_builtins(t) for t in req.tools or []]
    return plan_from(messages, defs, name, template)


def plan_from(
    messages: list[dict[str, Any]], defs: list[dict[str, Any]], choice: str | None, template: str | None
) -> ToolPlan | None:
    """:func:`plan` for any dialect: OpenAI-shaped messages and tool definitions; ``choice`` is ``auto``
    (or None), ``none``, ``required``, or the name of the function to call."""
    history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not defs and not history:
        return None
    offered = defs if choice != "none" else []
    rendered, template_tools = prompt_messages(messages, offered, template)
    forced = None if choice in (None, "auto", "none", "required") else choice
    text = forced_grammar(offered, forced, template) if offered and (choice == "required" or forced) else ""
    return ToolPlan(rendered, template_tools, text, frozenset(t["function"]["name"] for t in offered))


def calls_out(calls: Sequence[ToolCall]) -> list[s.ToolCallOut]:
    return [s.ToolCallOut(c.id, s.FunctionOut(c.name, c.arguments)) for c in calls]


def calls_delta(calls: Sequence[ToolCall]) -> list[s.ToolCallDelta]:
    return [s.ToolCallDelta(i, c.id, s.FunctionOut(c.name, c.arguments)) for i, c in enumerate(calls)]
