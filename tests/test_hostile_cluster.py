"""A misbehaving peer that holds the cluster secret, against two real node processes.

The peer completes the handshake (it has the secret and the model's fingerprint, so it is a member) and
sends well-formed but wrong messages: forged commits, huge epochs, a forged leader, steps, activations,
tokens and closes for requests it does not own, a flood of request opens, replays of every frame the nodes
sent it; then it leaves. Real clients' greedy answers stay those of the quiet cluster throughout and
after, the nodes never leave their two-node plan, and they count what they refused.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_proc import free_port_block
from hostile_peer import complete, identity

from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.wire.messages import (
    ActivationChunk,
    Message,
    PlanCommit,
    PlanProposal,
    RequestClose,
    RequestOpen,
    ResendTokens,
    SamplingSpec,
    StageRange,
    StepInput,
    SuspectNode,
    TokenChunk,
)
from exo_stable.wire.peerlink import WIRE_PATH, PeerLink

pytestmark = [pytest.mark.timeout(300)]

LAYERS = 4
PROMPTS = [[5, 17, 42, 99, 7], [3, 1, 4, 1, 5, 9, 2, 6], [100, 200, 300]]


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("hcluster") / "tiny.gguf", default_gguf, layers=LAYERS, seed=9)


@pytest.fixture
def two_nodes(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[list[int], str, str]]:
    base = free_port_block(2)
    ports = [base, base + 1]
    prefix = f"h{secrets.token_hex(3)}n"
    secret = secrets.token_hex(16)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_STABLE_")}
    procs = []
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "exo_stable", "serve", "--model", str(tiny_model), "--port", str(port)]
        cmd += ["--node-id", f"{prefix}{i}", "--peers", peers, "--no-discovery", "--dtype", "float32"]
        cmd += ["--cluster-secret", secret]
        with (tmp_path / f"node{i}.log").open("wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
    try:
        yield ports, prefix, secret
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            text = (tmp_path / f"node{i}.log").read_text(errors="replace")
            assert proc.returncode == 0, f"node {i} exited {proc.returncode}:\n{text[-3000:]}"
            assert "Traceback" not in text, text[-5000:]
            assert "\nCRITICAL" not in text, "a forged log line"


async def plans(http: aiohttp.ClientSession, ports: list[int]) -> list[dict[str, Any] | None]:
    out = []
    for port in ports:
        try:
            async with http.get(f"http://127.0.0.1:{port}/v1/cluster") as resp:
                out.append((await resp.json())["plan"])
        except aiohttp.ClientError:
            out.append(None)
    return out


async def two_stage_plan(http: aiohttp.ClientSession, ports: list[int], timeout: float = 120.0) -> dict[str, Any]:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            got = await plans(http, ports)
            if all(p is not None and len(p["stages"]) == 2 for p in got) and len({p["epoch"] for p in got}) == 1:  # type: ignore[index]
                assert got[0] is not None
                return got[0]
            await asyncio.sleep(0.3)  # other processes' state: polled


def attack(plan: dict[str, Any], me: str, fingerprint: str, seen: list[Message]) -> list[Message]:
    epoch = plan["epoch"]
    stages = tuple(StageRange(s["node_id"], s["start"], s["end"]) for s in plan["stages"])
    mine = (StageRange(me, 0, LAYERS),)
    owner = stages[0].node_id
    rids = [f"{owner}-{i}-{secrets.token_hex(4)}" for i in range(4)]
    fields = dict(model_fingerprint=fingerprint, n_layers=LAYERS)
    out: list[Message] = [
        PlanCommit(epoch=10**6, leader=me, stages=mine, **fields),  # type: ignore[arg-type]
        PlanCommit(epoch=epoch + 1, leader=plan["leader"], stages=mine, **fields),  # type: ignore[arg-type]
        PlanProposal(epoch=2**62, leader=me, stages=mine, **fields),  # type: ignore[arg-type]
        PlanProposal(epoch=epoch + 1, leader=plan["leader"], stages=stages[::-1], **fields),  # type: ignore[arg-type]
        SuspectNode(node_id=owner, reporter=plan["leader"], reason="forged\nCRITICAL the node is on fire"),
        SuspectNode(node_id=owner, reporter=me, reason="x", ttl_s=1e18),
    ]
    for rid in rids:
        out += [
            StepInput(request_id=rid, plan_epoch=epoch, step=1, position=3, tokens=(1,)),
            TokenChunk(request_id=rid, sequence_position=0, token_id=7, source_device_rank=1, plan_epoch=epoch),
            ActivationChunk(
                request_id=rid,
                step=0,
                chunk_index=0,
                chunk_count=1,
                offset=0,
                dtype="float32",
                shape=(1, 1),
                total_nbytes=4,
                data=b"\0\0\0\0",
                checksum=0,
                tensor_checksum=0,
                plan_epoch=epoch,
            ),
            RequestClose(request_id=rid),
            ResendTokens(request_id=rid, positions=(0, 1)),
        ]
    out += [
        RequestOpen(
            request_id=f"flood-{i}",
            owner=me,
            plan_epoch=epoch,
            sampling=SamplingSpec(),
            max_tokens=10**9 if i % 2 else 4,
            prompt_tokens=1,
            barrier=f"open/flood-{i}",
        )
        for i in range(40)
    ]
    out += seen  # replays of everything the nodes sent this peer, now as its own
    return out


async def test_a_misbehaving_member_changes_no_answer(two_nodes: tuple[list[int], str, str]) -> None:
    ports, prefix, secret = two_nodes
    async with aiohttp.ClientSession() as http:
        plan = await two_stage_plan(http, ports)
        roots = [f"http://127.0.0.1:{p}" for p in ports]
        reference = [await complete(http, roots[0], prompt) for prompt in PROMPTS]
        assert [await complete(http, roots[1], prompt) for prompt in PROMPTS] == reference
        fingerprint = plan["model_fingerprint"]
        me = "zz-mallory"  # sorts after the nodes: a member, never the leader
        seen: list[Message] = []
        links = [
            PeerLink(
                identity(me, fingerprint, memory_bytes=0), url=f"ws://127.0.0.1:{p}{WIRE_PATH}", secret=secret.encode()
            )
            for p in ports
        ]
        for link in links:
            await link.start()
            await link.wait_connected(timeout=30)

        async def record(link: PeerLink) -> None:
            while not link.closed:
                try:
                    seen.append(await link.recv(timeout=1.0))
                except TimeoutError:
                    continue

        recorders = [asyncio.create_task(record(link)) for link in links]

        async def clients() -> list[str]:
            return [await complete(http, roots[i % 2], PROMPTS[i % 3]) for i in range(12)]

        answering = asyncio.create_task(clients())
        for _ in range(2):  # the attack twice: the second round also replays what the first drew out
            for link in links:
                for message in attack(plan, me, fingerprint, list(seen)):
                    await link.send(message, timeout=30)
            for link in links:
                await link.wait_acked(timeout=60)
        answers = await answering
        assert answers == [reference[i % 3] for i in range(12)]
        during = await plans(http, ports)
        nodes = {f"{prefix}0", f"{prefix}1"}
        assert all(p is not None and {s["node_id"] for s in p["stages"]} == nodes for p in during), during
        for task in recorders:
            task.cancel()
        for link in links:
            await link.close()  # it leaves
        after = await two_stage_plan(http, ports)
        assert {s["node_id"] for s in after["stages"]} == {f"{prefix}0", f"{prefix}1"}
        assert [await complete(http, roots[i], p) for i in (0, 1) for p in PROMPTS] == reference * 2
        for root in roots:
            async with http.get(f"{root}/metrics") as resp:
                metrics = await resp.text()
            refused = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("exo_stable_peer_messages_refused_total")
            )
            assert refused >= 40, metrics
            async with http.get(f"{root}/health") as resp:
                health = await resp.json()
            assert not health["supervision"]["suspects"], health
