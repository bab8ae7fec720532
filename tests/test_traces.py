"""Per-request traces: the bounded ring, ``GET /v1/traces/{id}``, and ``exo_trace`` in responses.

On a 2-stage cluster of in-process nodes over real sockets, the trace of a request names which node
computed which layers at every step, with step times, activation sizes and checksums.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from inproc_cluster import in_process_cluster
from server_proc import assert_openai_error

from exo_stable.api.server import ApiConfig, create_app
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
from exo_stable.pipeline.trace import RequestTrace, StepRecord, TraceRing, decode_breakdown
from exo_stable.wire.messages import CODEC, StepHop, TokenChunk

pytestmark = pytest.mark.asyncio(loop_scope="module")

N_LAYERS = 4
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def record(node: str, step: int) -> StepRecord:
    return StepRecord(step, step, node, 0, (0, 4), 1, 0.01, 10, "00000000", 0, 0.0)


async def test_the_ring_keeps_the_last_traces_and_bounds_their_steps() -> None:
    ring = TraceRing(2, max_steps=3)
    a = ring.open("a", backend="pipeline", prompt_tokens=5)
    ring.open("b", backend="pipeline", prompt_tokens=5)
    ring.open("c", backend="pipeline", prompt_tokens=5)
    assert ring.get("a") is None and ring.get("b") is not None and ring.get("c") is not None
    assert len(ring) == 2 and ring.evicted == 1
    for i in range(5):
        a.step(record("n0", i))
    body = a.as_dict()
    assert body["steps_kept"] == 3 and body["steps_dropped"] == 2
    assert body["nodes"]["n0"]["steps"] == 5, "per-node totals cover every step, kept or not"
    assert body["nodes"]["n0"]["bytes_out"] == 50
    with pytest.raises(ValueError, match="at least one"):
        TraceRing(0)


def hop_record(step: int, stage: int, received_at: float, stage_ms: float, compute_ms: float) -> dict[str, Any]:
    return {
        "step": step,
        "stage": stage,
        "tokens": 1,
        "attempt": 0,
        "received_at": received_at,
        "stage_ms": stage_ms,
        "compute_ms": compute_ms,
    }


async def test_the_decode_breakdown_splits_each_step_into_compute_handoff_and_wire() -> None:
    records = []
    for step in range(4):  # a step every 10 ms: stage 0 takes 4 ms (3 computing), 1 ms on the wire, stage 1
        t0 = 100.0 + step * 0.010  # takes 3.5 ms (3 computing), then 1.5 ms until stage 0 takes the next step
        records += [hop_record(step, 0, t0, 4.0, 3.0), hop_record(step, 1, t0 + 0.005, 3.5, 3.0)]
    records.append({**hop_record(9, 0, 200.0, 1.0, 1.0), "tokens": 12})  # a prompt chunk: not a decode step
    records.append({**hop_record(2, 0, 150.0, 9.0, 9.0), "attempt": 1})  # after a recovery: not counted
    b = decode_breakdown(records)
    assert b is not None and b["steps"] == 3  # the last step has no next one to close it
    assert b["step_ms"] == 10.0
    assert b["stages"] == [
        {"stage": 0, "compute_ms": 3.0, "handoff_ms": 1.0},
        {"stage": 1, "compute_ms": 3.0, "handoff_ms": 0.5},
    ]
    assert b["wire_ms"] == [1.0, 1.5]
    assert decode_breakdown(records[:2]) is None, "one step says nothing about the time between steps"
    assert decode_breakdown([{**r, "received_at": 0.0} for r in records]) is None, "an old node reports no clock"


async def test_hops_travel_in_tokens_and_old_peers_decode_without_them() -> None:
    hop = StepHop(node_id="n1", stage=1, start=2, end=4, step=7, position=3, tokens=1, stage_s=0.002, checksum="ab")
    token = TokenChunk(request_id="r", sequence_position=3, token_id=9, source_device_rank=1, hops=(hop,))
    decoded = CODEC.decode(CODEC.encode(token))
    assert isinstance(decoded, TokenChunk) and decoded.hops == (hop,)
    legacy = {"t": "token", "request_id": "r", "sequence_position": 0, "token_id": 1, "source_device_rank": 0}
    old = CODEC.decode(msgspec.msgpack.encode(legacy))
    assert isinstance(old, TokenChunk) and old.hops == () and old.hops_lost == 0


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("traces") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=4)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The response's JSON body, or every data event of a stream, in order."""
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            return [await resp.json()]
        events = []
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                events.append(json.loads(line.removeprefix("data: ")))
        return events


async def get_trace(http: aiohttp.ClientSession, root: str, request_id: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{root}/v1/traces/{request_id}") as resp:
        return resp.status, await resp.json()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def single_device(tiny_model: Path) -> AsyncIterator[str]:
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    runner = web.AppRunner(create_app(InferenceService(engine), ApiConfig(trace_ring=4)), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        engine.close()


async def test_single_device_trace_and_summary(single_device: str) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{single_device}/v1/chat/completions"
        (reply,) = await post(http, url, {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "exo_trace": True})
        (plain,) = await post(http, url, {"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
        status, trace = await get_trace(http, single_device, reply["id"])
        missing_status, missing = await get_trace(http, single_device, "chatcmpl-unknown")
    n = reply["usage"]["completion_tokens"]
    summary = reply["exo_trace"]
    assert "exo_trace" not in plain, "only a request that asks gets the summary"
    assert summary["id"] == reply["id"] and summary["backend"] == "single_device"
    assert summary["completion_tokens"] == n and summary["finish_reason"] == reply["choices"][0]["finish_reason"]
    assert summary["nodes"] == {
        "single-device": {
            "layers": [[0, N_LAYERS]],
            "steps": n,
            "tokens": reply["usage"]["prompt_tokens"] + n - 1,
            "stage_ms": summary["nodes"]["single-device"]["stage_ms"],
            "compute_ms": 0.0,
            "bytes_out": 0,
        }
    }
    assert status == 200 and trace["object"] == "exo.trace"
    assert [s["position"] for s in trace["step_records"]] == list(range(n))
    assert trace["duration_ms"] is not None
    assert_openai_error(missing_status, missing, 404)
    assert missing["error"]["code"] == "trace_not_found"


async def test_a_two_stage_trace_names_each_nodes_layers_at_every_step(tiny_model: Path) -> None:
    async with in_process_cluster(tiny_model, 2, "tr", split=(1, 3)) as (nodes, _), aiohttp.ClientSession() as http:
        root = [f"http://127.0.0.1:{node.port}" for node in nodes]
        body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True, "exo_trace": True}
        events = await post(http, f"{root[1]}/v1/chat/completions", body)  # owned by the second node
        status, trace = await get_trace(http, root[1], events[0]["id"])
        elsewhere, _ = await get_trace(http, root[0], events[0]["id"])
    last = events[-1]
    assert last["choices"] == [] and "exo_trace" in last, "the summary rides the stream's last chunk"
    assert all("exo_trace" not in e for e in events[:-1])
    n = trace["completion_tokens"]
    assert status == 200 and n >= 1 and last["exo_trace"]["completion_tokens"] == n
    assert elsewhere == 404, "a trace lives on the node that owned the request"
    assert trace["backend"] == "pipeline"
    assert trace["nodes"]["tr-0"]["layers"] == [[0, 1]]
    assert trace["nodes"]["tr-1"]["layers"] == [[1, N_LAYERS]]
    (plan,) = [e for e in trace["events"] if e["kind"] == "plan"]
    assert plan["stages"] == [{"node_id": "tr-0", "layers": [0, 1]}, {"node_id": "tr-1", "layers": [1, N_LAYERS]}]
    records = trace["step_records"]
    for position in range(n):
        at = [r for r in records if r["position"] == position and r["tokens"] >= 1]
        assert [(r["node_id"], r["layers"]) for r in at] == [("tr-0", [0, 1]), ("tr-1", [1, N_LAYERS])], position
        first, second = at
        assert first["step"] == second["step"]
        assert first["bytes_out"] > 0 and len(first["checksum"]) == 8, "stage 0 sent a checksummed activation"
        assert second["bytes_out"] == 0 and second["checksum"], "the last stage sealed a token"
        assert first["stage_ms"] >= 0 and second["stage_ms"] >= 0
        for r in at:  # each stage says when it took the step in and how much of its time was the forward call
            assert 0 < r["compute_ms"] <= r["stage_ms"] and r["received_at"] > 0
        assert second["received_at"] >= first["received_at"] + first["stage_ms"] / 1000 - 1e-3, "stage 1 came after"
    breakdown = decode_breakdown(records)
    assert breakdown is not None and breakdown["steps"] >= 2 and len(breakdown["stages"]) == 2
    assert len(breakdown["wire_ms"]) == 2 and all(w >= 0 for w in breakdown["wire_ms"])
    assert trace["nodes"]["tr-0"]["bytes_out"] == sum(r["bytes_out"] for r in records if r["node_id"] == "tr-0")
    assert trace["recoveries"] == 0 and trace["hops_lost"] == 0


async def test_a_recovery_shows_in_the_trace_and_the_replay_avoids_the_lost_node(tiny_model: Path) -> None:
    prompt = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198]
    async with in_process_cluster(tiny_model, 3, "trr", memory_bytes=1 << 30) as (nodes, stops):
        trace = RequestTrace("t", backend="pipeline", prompt_tokens=len(prompt))
        result = GenerationResult(prompt_tokens=len(prompt))
        job = GenerationJob(prompt, SamplingParams(), 16)
        async with aclosing(nodes[0].owner.stream(job, trace)) as deltas:
            async for delta in deltas:
                result.add(delta)
                if len(result.token_ids) >= 4 and not stops[2].is_set():
                    stops[2].set()  # the last stage's node leaves mid-answer
    body = trace.as_dict()
    assert body["recoveries"] >= 1
    (recovery, *_) = [e for e in body["events"] if e["kind"] == "recovery"]
    assert recovery["from_position"] >= 4 and recovery["mechanism"]
    plans = [e for e in body["events"] if e["kind"] == "plan"]
    assert len(plans) >= 2 and all(s["node_id"] != "trr-2" for s in plans[-1]["stages"])
    before = {r["node_id"] for r in body["step_records"] if r["attempt"] == 0}
    after = {r["node_id"] for r in body["step_records"] if r["attempt"] == body["recoveries"]}
    assert "trr-2" in before and after and "trr-2" not in after
