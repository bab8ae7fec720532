"""Bounded, seeded hypothesis fuzzing of the HTTP API (OpenAI, Anthropic and Ollama dialects) on a real node.

Requests are valid ones with fields replaced by arbitrary JSON, extra fields, wrong types and sizes, broken
JSON and random bytes, on every route. Every answer must be below 500, an error must be the dialect's
error object, a stream must end with ``[DONE]``; afterwards the node holds no request and answers as before.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_node import FUZZ_EXAMPLES, BackgroundNode, background_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_stable.engine.synthetic import tiny_gguf

EXAMPLES = FUZZ_EXAMPLES or 600
COUNTS = {"cases": 0, "ok": 0, "client_errors": 0}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=40) | st.integers(min_value=-(2**64), max_value=2**64)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", ""])
content = st.text(max_size=200) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": st.text(max_size=40)}),
    max_size=3,
)
message = st.fixed_dictionaries({"role": roles}, optional={"content": content | json_values, "name": json_values})
SAMPLING = {
    "model": st.text(max_size=20) | json_values,
    "max_tokens": small_ints | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": st.floats(min_value=-1, max_value=2) | json_values,
    "top_k": small_ints,
    "seed": small_ints,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_values,
    "n": small_ints,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}),
    "user": json_values,
    "exo_replay": st.sampled_from(["exact", "fast", "slow"]) | json_values,
    "exo_validation": st.sampled_from(["off", "light", "strict", "max"]) | json_values,
    "exo_trace": st.booleans() | json_values,
    "max_completion_tokens": small_ints,
    "echo": st.booleans() | json_values,
}
extra = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in SAMPLING), json_values, max_size=3)
chat = st.builds(
    lambda base, more: {**base, **more},
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}, optional=SAMPLING),
    extra,
)
prompt = st.text(max_size=300) | st.lists(st.integers(min_value=-5, max_value=60000), max_size=50) | json_values
completion = st.builds(
    lambda base, more: {**base, **more},
    st.fixed_dictionaries({"prompt": prompt}, optional=SAMPLING),
    extra,
)
tokenize = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=300) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "add_generation_prompt": st.booleans() | json_values,
    },
)


def encode(body: Any, how: str) -> bytes:
    raw = json.dumps(body).encode()
    if how == "truncated":
        return raw[: max(1, len(raw) // 2)]
    if how == "nested":
        return b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    return raw


valid_sampling = st.builds(
    lambda base, stream: {**base, **stream},
    st.fixed_dictionaries(
        {"max_tokens": st.integers(1, 8)},
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "top_k": st.integers(0, 50),
            "seed": st.integers(0, 2**63),
            "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
            "exo_trace": st.booleans(),
        },
    ),
    st.just({})
    | st.fixed_dictionaries(
        {"stream": st.just(True)}, optional={"stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
    ),
)
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=80)}
)
valid = st.one_of(
    st.tuples(
        st.just("/v1/chat/completions"),
        st.builds(lambda m, p: {"messages": m, **p}, st.lists(valid_message, min_size=1, max_size=3), valid_sampling),
        st.just("json"),
    ),
    st.tuples(
        st.just("/v1/completions"),
        st.builds(lambda t, p: {"prompt": t, **p}, st.text(min_size=1, max_size=80), valid_sampling),
        st.just("json"),
    ),
)
anthropic = st.builds(
    lambda base, more: {**base, **more},
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3) | json_values},
        optional={
            "model": json_values,
            "max_tokens": small_ints | json_values,
            "system": st.text(max_size=40) | json_values,
            "stream": st.booleans(),
            "temperature": st.floats(-1, 3),
            "stop_sequences": json_values,
        },
    ),
    extra,
)
ollama = st.builds(
    lambda base, more: {**base, **more},
    st.fixed_dictionaries(
        {},
        optional={
            "model": json_values,
            "messages": st.lists(message, max_size=3) | json_values,
            "prompt": st.text(max_size=80) | json_values,
            "stream": st.booleans() | json_values,
            "options": st.dictionaries(
                st.sampled_from(["num_predict", "temperature", "seed", "top_k", "x"]),
                small_ints | json_values,
                max_size=3,
            )
            | json_values,
            "raw": st.booleans(),
            "system": json_values,
        },
    ),
    extra,
)
OTHER_DIALECTS = ("/v1/messages", "/api/")
requests = st.one_of(
    valid,
    valid,
    valid,
    st.tuples(st.just("/v1/messages"), anthropic, st.sampled_from(["json", "json", "truncated", "nested"])),
    st.tuples(
        st.sampled_from(["/api/chat", "/api/generate", "/api/show"]), ollama, st.sampled_from(["json", "truncated"])
    ),
    st.tuples(st.just("/v1/chat/completions"), chat, st.sampled_from(["json", "json", "truncated", "nested"])),
    st.tuples(st.just("/v1/completions"), completion, st.sampled_from(["json", "json", "truncated"])),
    st.tuples(st.just("/v1/tokenize"), tokenize, st.sampled_from(["json", "truncated"])),
    st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/nope", "/health"]),
        st.binary(max_size=200),
        st.just("raw"),
    ),
)


@pytest.fixture(scope="module")
def fuzz_target(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundNode]:
    model = tiny_gguf(tmp_path_factory.mktemp("fuzzapi") / "tiny.gguf", default_gguf, layers=2, seed=11)
    with background_node(model) as node:
        yield node


def send(node: BackgroundNode, method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", node.node.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(request=requests)
def test_no_request_gets_a_5xx(fuzz_target: BackgroundNode, request: tuple[str, Any, str]) -> None:
    path, body, how = request
    raw = body if how == "raw" else encode(body, how)
    method = "GET" if path == "/health" else "POST"
    status, answer, content_type = send(fuzz_target, method, path, raw)
    COUNTS["cases"] += 1
    assert status < 500, (status, answer[:500], raw[:300])
    if status >= 400:
        COUNTS["client_errors"] += 1
        error = json.loads(answer)["error"]  # each dialect's own error shape
        if path.startswith("/api/"):
            assert isinstance(error, str) and error, answer
        else:
            assert isinstance(error["message"], str) and error["type"], answer
    else:
        COUNTS["ok"] += 1
        if "text/event-stream" in content_type and path.startswith("/v1/messages"):
            assert b"event: message_stop" in answer or b"event: error" in answer, answer[-300:]
        elif "text/event-stream" in content_type:
            assert answer.rstrip().endswith(b"data: [DONE]"), answer[-300:]
        elif "ndjson" in content_type:
            assert all(json.loads(line) is not None for line in answer.splitlines() if line.strip())
        else:
            json.loads(answer)


def test_after_the_fuzz_the_node_holds_nothing_and_answers(fuzz_target: BackgroundNode) -> None:
    node = fuzz_target.node
    assert not node.owner.requests
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}).encode()
    status, answer, _ = send(fuzz_target, "POST", "/v1/completions", body)
    assert status == 200, answer
    stage = node.stage_host.actor
    assert stage is not None
    deadline = time.monotonic() + 10
    while stage.open_requests and time.monotonic() < deadline:
        time.sleep(0.05)  # the stage closes its last request on its own thread: polled
    assert stage.open_requests == 0, "a request stayed open on the stage"
    print(f"API fuzz: {COUNTS['cases']} cases, {COUNTS['ok']} answered, {COUNTS['client_errors']} refused (4xx)")
