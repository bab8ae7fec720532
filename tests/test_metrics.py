"""``GET /metrics`` on real servers: a single-device API app and in-process cluster nodes over real sockets.

The exposition must parse with prometheus-client's own parser, and its counters must move: tokens and
latency histograms with every request, link corruption and retransmission counters when the links' fault
injector corrupts and drops frames.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from inproc_cluster import in_process_cluster
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exo_stable.api.server import ApiConfig, create_app
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.pipeline.service import InferenceService

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES = [{"role": "user", "content": "Count to five."}]


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("metrics") / "tiny.gguf", default_gguf, layers=4, seed=3)


def parse(text: str) -> dict[str, list[Sample]]:
    """Samples by name, through prometheus-client's parser (raises on a malformed exposition)."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


async def scrape(http: aiohttp.ClientSession, root: str) -> dict[str, list[Sample]]:
    async with http.get(f"{root}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


async def chat(http: aiohttp.ClientSession, root: str, max_tokens: int, *, stream: bool = False) -> int:
    """One greedy chat completion; returns its completion tokens."""
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{root}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return int((await resp.json())["usage"]["completion_tokens"])
        usage = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"usage":{' in line:
                usage = json.loads(line.removeprefix("data: "))["usage"]
        assert usage is not None
        return int(usage["completion_tokens"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def single_device(tiny_model: Path) -> AsyncIterator[tuple[str, SingleDeviceEngine]]:
    """A single-device API app on a real socket; yields its root URL and its engine."""
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    runner = web.AppRunner(create_app(InferenceService(engine), ApiConfig()), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}", engine
    finally:
        await runner.cleanup()
        engine.close()


async def test_single_device_metrics_parse_and_follow_requests(
    single_device: tuple[str, SingleDeviceEngine],
) -> None:
    root, engine = single_device
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, root)
        assert value(before, "exo_stable_tokens_generated_total") == 0
        assert value(before, "exo_stable_active_requests") == 0
        assert value(before, "exo_stable_kv_cache_bytes") == 0
        n1 = await chat(http, root, 6)
        n2 = await chat(http, root, 5, stream=True)
        # The engine frees a finished request's cache on its compute thread after the reply; a job queued
        # behind that (the thread runs jobs in order) returns once it is done.
        await engine.logits([1, 2])
        after = await scrape(http, root)
    assert n1 >= 1 and n2 >= 1
    assert value(after, "exo_stable_tokens_generated_total") == n1 + n2
    assert value(after, "exo_stable_time_to_first_token_seconds_count") == 2
    assert value(after, "exo_stable_time_to_first_token_seconds_sum") > 0
    assert value(after, "exo_stable_inter_token_latency_seconds_count") == n1 + n2 - 2
    assert value(after, "exo_stable_decode_tokens_total") == n1 + n2 - 2
    assert value(after, "exo_stable_prompt_tokens_total") > 0
    assert value(after, "exo_stable_prefill_tokens_per_second") > 0
    ended = sum(s.value for s in after["exo_stable_requests_total"])
    assert ended == 2, after["exo_stable_requests_total"]
    assert value(after, "exo_stable_active_requests") == 0
    assert value(after, "exo_stable_kv_cache_bytes") == 0, "every request's cache is freed"


async def test_kv_cache_bytes_show_an_open_request(single_device: tuple[str, SingleDeviceEngine]) -> None:
    root, _ = single_device
    async with aiohttp.ClientSession() as http:
        body = {"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
        async with http.post(f"{root}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events = 0
            while events < 2:  # the role chunk (sent before the prompt is read), then the first token's
                events += (await resp.content.readline()).startswith(b"data: ")
            during = await scrape(http, root)
            await resp.read()
        after = await scrape(http, root)
    assert value(during, "exo_stable_active_requests") == 1
    assert value(during, "exo_stable_kv_cache_bytes") > 0
    assert value(after, "exo_stable_active_requests") == 0


async def test_cluster_metrics_count_injected_link_faults(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_STABLE_FAULTS", "corrupt=0.05,drop=0.05,seed=11")
    # Two tokens altered after the last stage sealed them: only the owner's token checksum can see it.
    monkeypatch.setenv("EXO_STABLE_INTEGRITY_FAULTS", "token=1,skip=3,limit=2")
    async with in_process_cluster(tiny_model, 2, "mx", split=(2, 2)) as (nodes, _), aiohttp.ClientSession() as http:
        roots = [f"http://127.0.0.1:{node.port}" for node in nodes]
        n = await chat(http, roots[0], 24)
        n += await chat(http, roots[1], 24, stream=True)
        scraped = [await scrape(http, root) for root in roots]
    owner0, owner1 = scraped
    assert value(owner0, "exo_stable_tokens_generated_total") + value(owner1, "exo_stable_tokens_generated_total") == n
    for samples, node, other in zip(scraped, nodes, reversed(nodes), strict=True):
        injected_corrupt = value(samples, "exo_stable_faults_injected_total", fault="corrupted")
        detected = sum(
            s.value
            for s in samples.get("exo_stable_corruptions_detected_total", [])
            if s.labels["kind"].startswith("frame_")
        )
        assert injected_corrupt > 0, f"{node.node_id}: the injector corrupted nothing"
        assert 0 < detected <= injected_corrupt, (node.node_id, detected, injected_corrupt)
        assert value(samples, "exo_stable_faults_injected_total", fault="dropped") > 0
        # Frames the peer's injector dropped or corrupted are retransmitted by this side.
        assert value(samples, "exo_stable_peer_retransmits_total", peer=other.node_id) > 0
        assert value(samples, "exo_stable_peer_bytes_sent_total", peer=other.node_id) > 0
        assert value(samples, "exo_stable_peer_bytes_received_total", peer=other.node_id) > 0
        assert samples["exo_stable_peer_rtt_seconds"], "a connected link has an RTT"
        assert value(samples, "exo_stable_peers_connected", peer=other.node_id) == 1
        assert value(samples, "exo_stable_stage_steps_total") > 0
        assert "exo_stable_kv_cache_bytes" in samples
    assert value(owner0, "exo_stable_owner_requests_total", state="finished") == 1
    token_faults = sum(value(x, "exo_stable_corruptions_detected_total", kind="token_checksum") for x in scraped)
    assert token_faults == 2, "each altered token is caught by its checksum at its owner"
    assert sum(value(x, "exo_stable_owner_resend_requests_total") for x in scraped) >= 2
    assert value(owner0, "exo_stable_time_to_first_token_seconds_count") == 1


async def test_batch_histograms_follow_concurrent_requests(single_device: tuple[str, SingleDeviceEngine]) -> None:
    root, engine = single_device
    assert engine.batch_limit >= 2, "the tiny model's float32 products are row-exact at 2 rows on a CPU"
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, root)
        counts = await asyncio.gather(*(chat(http, root, 12, stream=True) for _ in range(4)))
        after = await scrape(http, root)
    steps = value(after, "exo_stable_decode_batch_size_count") - value(before, "exo_stable_decode_batch_size_count")
    rows = value(after, "exo_stable_decode_batch_size_sum") - value(before, "exo_stable_decode_batch_size_sum")
    assert rows >= sum(counts) - 4  # every decode position after each request's first token (a few more may run ahead)
    assert rows > steps > 0  # some steps carried several requests
    assert value(after, "exo_stable_batch_queue_depth_count") > value(before, "exo_stable_batch_queue_depth_count")
    assert value(after, "exo_stable_decode_batch_size_bucket", le="+Inf") == value(
        after, "exo_stable_decode_batch_size_count"
    )
