"""Three real nodes split the default model into a 3-stage pipeline and answer like one device, token for token.

``scripts/local-cluster 3 --dtype float32`` starts the nodes (module-scoped); while they load, this process
computes the single-device reference for every chat case of the llama.cpp oracle with an in-process
``SingleDeviceEngine`` in the same dtype, through the same ``TextStream`` the API uses. Every case then
streams through the real ``openai`` client from a different node (the request's owner need not be stage
0), and must give exactly the reference text, with I2/I3's framing: the first delta carries the assistant
role, exactly one chunk has a finish reason, no delta has U+FFFD where the reference has none, and the raw
SSE ends with ``data: [DONE]``.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cluster_proc import LocalCluster, wait_gone
from conftest import oracle_dir
from openai import AsyncOpenAI
from server_proc import case_named, stream_request

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
from exo_stable.tokenizer import ChatMessage

# The module fixture (3 nodes loading, the reference, the ready wait) is charged to the first test.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(480)]

NODES = 3
DTYPE = "float32"
MAX_TOKENS = 16
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
SEEDED_CASE, SEEDED_TEMPERATURE, SEED = "haiku", 0.8, 7
RAW_CASE = "emoji"  # multi-byte characters split across tokens: the stream must not leak U+FFFD
CHAT_CASES = [
    c["name"]
    for c in json.loads((oracle_dir() / "smollm2-llamacpp.json").read_text(encoding="utf-8"))["cases"]
    if "messages" in c
]


@dataclass(frozen=True)
class Reference:
    """What the single device streams for one request."""

    deltas: tuple[str, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def _node_for(name: str) -> int:
    """Spread the cases over the nodes, so that every node owns some requests."""
    return CHAT_CASES.index(name) % NODES


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The script, started; not yet ready. At teardown every node must stop cleanly and none may be left."""
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    secret = secrets.token_hex(16)  # no node outside this cluster can join it
    cluster = LocalCluster.launch(NODES, "--dtype", DTYPE, "--cluster-secret", secret, "--log-dir", str(log_dir))
    try:
        yield cluster
    finally:
        status = cluster.stop()
        logs = cluster.logs()
        left = wait_gone(cluster.node_ids, 15.0)
    assert status == 0, f"local-cluster exited with {status}:\n{cluster.text}\n{logs}"
    assert not left, f"nodes outlived the script: {left}"
    assert "Traceback" not in logs, logs


async def _reference(
    service: InferenceService, messages: Sequence[dict[str, str]], params: SamplingParams
) -> Reference:
    prompt = service.tokenizer.encode_chat([ChatMessage(m["role"], m["content"]) for m in messages])
    result = GenerationResult(prompt_tokens=len(prompt))
    deltas: list[str] = []
    await service.admit()
    try:
        async with aclosing(service.stream(GenerationJob(prompt, params, MAX_TOKENS))) as stream:
            deltas = [result.add(delta).text async for delta in stream]
    finally:
        service.release()
    assert result.finish_reason is not None
    return Reference(tuple(deltas), result.finish_reason)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(launched: LocalCluster, default_gguf: Path, oracle: dict[str, Any]) -> dict[str, Reference]:
    """Single-device output per chat case (greedy), and for the seeded case under "seeded".

    Depends on ``launched`` only so that it runs while the nodes load.
    """
    assert [c["name"] for c in oracle["cases"] if "messages" in c] == CHAT_CASES
    engine = SingleDeviceEngine(open_model(default_gguf), dtype=Dtype(DTYPE))
    service = InferenceService(engine, max_active=1)
    try:
        await engine.start()
        refs = {
            name: await _reference(service, case_named(oracle, name)["messages"], SamplingParams(temperature=0.0))
            for name in CHAT_CASES
        }
        seeded = SamplingParams(temperature=SEEDED_TEMPERATURE, seed=SEED)
        refs["seeded"] = await _reference(service, case_named(oracle, SEEDED_CASE)["messages"], seeded)
    finally:
        engine.close()
    return refs


@pytest.fixture(scope="module")
def cluster(launched: LocalCluster, reference: dict[str, Reference]) -> LocalCluster:
    """The 3-stage pipeline, ready on every node (the script checked every node's /v1/cluster)."""
    try:
        launched.wait_ready(START_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}\n{launched.logs()}") from exc
    return launched


@pytest_asyncio.fixture(loop_scope="module")
async def clients(cluster: LocalCluster) -> AsyncIterator[list[AsyncOpenAI]]:
    """One ``openai`` client per node."""
    made = [
        AsyncOpenAI(base_url=cluster.base_url(i), api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        for i in range(NODES)
    ]
    try:
        yield made
    finally:
        for client in made:
            await client.close()


@dataclass
class Chunks:
    """One streamed chat completion, one entry per chunk: its delta's role and content, its finish reason."""

    roles: list[str | None] = field(default_factory=list)
    contents: list[str | None] = field(default_factory=list)
    finishes: list[str | None] = field(default_factory=list)


def assert_stream_matches(chunks: Chunks, ref: Reference) -> None:
    """I2/I3 for one streamed chat completion against the single device's output."""
    roles, contents, finishes = chunks.roles, chunks.contents, chunks.finishes
    assert roles and roles[0] == "assistant", f"the first delta has role {roles[:1]}"
    finished = [i for i, f in enumerate(finishes) if f is not None]
    assert len(finished) == 1, f"finish reasons {finishes}"
    assert finished[0] == len(finishes) - 1, "a chunk came after the one with the finish reason"
    assert finishes[-1] == ref.finish_reason
    deltas = [c for c in contents if c]
    at = 0
    for delta in deltas:
        for i, ch in enumerate(delta):
            if ch == "\ufffd":
                assert ref.text[at + i : at + i + 1] == "\ufffd", f"U+FFFD at {at + i} of {deltas}; reference {ref}"
        at += len(delta)
    assert "".join(deltas) == ref.text, f"deltas {deltas}\nreference {ref.deltas}"


async def _stream_chat(client: AsyncOpenAI, messages: Any, **sampling: Any) -> Chunks:
    stream = await client.chat.completions.create(
        model="default", messages=messages, max_tokens=MAX_TOKENS, stream=True, **sampling
    )
    chunks = Chunks()
    async with stream:
        async for chunk in stream:
            (choice,) = chunk.choices
            chunks.roles.append(choice.delta.role)
            chunks.contents.append(choice.delta.content)
            chunks.finishes.append(choice.finish_reason)
    return chunks


async def test_every_node_reports_the_same_three_stage_plan(cluster: LocalCluster, default_gguf: Path) -> None:
    source = open_model(default_gguf)
    views = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for i in range(NODES):
            async with http.get(f"{cluster.root(i)}/v1/cluster") as resp:
                assert resp.status == 200, await resp.text()
                views.append(await resp.json())
    plans = [view["plan"] for view in views]
    assert plans[0] is not None
    assert all(plan == plans[0] for plan in plans), plans
    plan = plans[0]
    stages = plan["stages"]
    assert [s["node_id"] for s in stages] and sorted(s["node_id"] for s in stages) == cluster.node_ids, stages
    assert stages[0]["start"] == 0 and stages[-1]["end"] == source.spec.num_hidden_layers, stages
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(stages)), stages
    assert all(s["end"] > s["start"] for s in stages), stages
    assert plan["leader"] in cluster.node_ids
    assert plan["model_fingerprint"] == source.fingerprint
    layers = {s["node_id"]: [s["start"], s["end"]] for s in stages}
    for view in views:
        assert sorted(n["id"] for n in view["nodes"]) == cluster.node_ids, view["nodes"]
        assert {n["id"]: n["layers"] for n in view["nodes"]} == layers, view["nodes"]
        assert {n["id"]: n["address"] for n in view["nodes"]} == {
            node_id: f"127.0.0.1:{port}" for node_id, port in zip(cluster.node_ids, cluster.ports, strict=True)
        }


@pytest.mark.parametrize("name", CHAT_CASES)
async def test_greedy_chat_streams_what_one_device_produces(
    name: str, clients: list[AsyncOpenAI], reference: dict[str, Reference], oracle: dict[str, Any]
) -> None:
    streamed = await _stream_chat(clients[_node_for(name)], case_named(oracle, name)["messages"], temperature=0)
    assert_stream_matches(streamed, reference[name])


async def test_seeded_sampling_matches_one_device(
    clients: list[AsyncOpenAI], reference: dict[str, Reference], oracle: dict[str, Any]
) -> None:
    ref = reference["seeded"]
    assert ref.text != reference[SEEDED_CASE].text, "this seed should sample away from the greedy reply"
    messages = case_named(oracle, SEEDED_CASE)["messages"]
    streamed = await _stream_chat(clients[NODES - 1], messages, temperature=SEEDED_TEMPERATURE, seed=SEED)
    assert_stream_matches(streamed, ref)


async def test_raw_sse_ends_with_done(
    cluster: LocalCluster, reference: dict[str, Reference], oracle: dict[str, Any]
) -> None:
    body = {"messages": case_named(oracle, RAW_CASE)["messages"], "max_tokens": MAX_TOKENS, "temperature": 0}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(cluster.root(1), timeout=timeout) as http:
        # stream_request checks that `data: [DONE]` is the last event and comes once, and one finish reason.
        streamed = await stream_request(http, "/v1/chat/completions", body)
    chunks = Chunks(
        roles=[c["choices"][0]["delta"].get("role") for c in streamed.chunks],
        contents=[c["choices"][0]["delta"].get("content") for c in streamed.chunks],
        finishes=[c["choices"][0]["finish_reason"] for c in streamed.chunks],
    )
    assert_stream_matches(chunks, reference[RAW_CASE])
