"""Role checks on peer messages: a peer that is linked is not thereby allowed to steer plans or stages.

One in-process node per test (real sockets); the hostile peer is a real PeerLink that sends well-formed
messages its role does not allow (cluster/roles.py), then leaves. Clients' answers stay those of a quiet node.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hostile_peer import complete, eventually, hostile_link, identity, send_all

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node, NodeConfig
from exo_stable.wire.messages import (
    BarrierArrive,
    PlanCommit,
    PlanProposal,
    RequestOpen,
    SamplingSpec,
    StageRange,
    StepInput,
    SuspectNode,
    TokenChunk,
)

LAYERS = 4
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("hostile") / "tiny.gguf", default_gguf, layers=LAYERS, seed=5)


@pytest.fixture
async def node(tiny_model: Path) -> AsyncIterator[Node]:
    config = NodeConfig(model=tiny_model, dtype=Dtype.FLOAT32, port=0, node_id=f"m{secrets.token_hex(3)}")
    n = Node(config, open_model(tiny_model))
    stop = asyncio.Event()
    task = asyncio.create_task(n.run(stop=stop, handle_signals=False))
    try:
        await n.wait_listening(timeout=60)
        await n.coordinator.wait_plan(timeout=60)
        yield n
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


def root(node: Node) -> str:
    return f"http://127.0.0.1:{node.port}"


def plan(epoch: int, leader: str, stages: tuple[StageRange, ...], fingerprint: str) -> tuple[PlanProposal, PlanCommit]:
    fields = dict(epoch=epoch, leader=leader, model_fingerprint=fingerprint, n_layers=LAYERS, stages=stages)
    return PlanProposal(**fields), PlanCommit(**fields)  # type: ignore[arg-type]


def opener(rid: str, owner: str, epoch: int, max_tokens: int = 4) -> RequestOpen:
    return RequestOpen(
        request_id=rid,
        owner=owner,
        plan_epoch=epoch,
        sampling=SamplingSpec(),
        max_tokens=max_tokens,
        prompt_tokens=1,
        barrier=f"open/{rid}",
    )


async def test_a_non_member_is_refused_everything_and_leaves_no_wedge(node: Node) -> None:
    """The issue's wedge: a peer holding another model committed plan 1001 naming itself, and got work done.
    Its link is closed as soon as the node sees the model differ; whatever it got in before that reaches the
    dispatcher, which acts on nothing from a non-member (sent here straight to it, as such a race would)."""
    async with aiohttp.ClientSession() as http:
        before = await complete(http, root(node), PROMPT)
        epoch = node.coordinator.active.epoch  # type: ignore[union-attr]
        hid = "a-stranger"  # sorts before the node's id: it would lead if it were a member
        me = identity(hid, "0" * 32)
        proposal, commit = plan(1001, hid, (StageRange(hid, 0, LAYERS),), node.source.fingerprint)
        forged = [
            proposal,
            commit,
            opener("x1", hid, epoch, max_tokens=10**9),
            StepInput(request_id="x1", plan_epoch=epoch, step=0, position=0, tokens=(1, 2)),
            SuspectNode(node_id=node.node_id, reporter=hid, reason="forged", ttl_s=1e12),
        ]
        async with hostile_link(node.port, me) as link:
            for message in forged:
                await link.send(message, timeout=10)
            await eventually("refused as a peer", lambda: hid in node.peers.refused)
        for message in forged:
            await node.dispatch(hid, message)
        assert node.refusals.by_kind["not_a_member"] >= len(forged)
        assert node.coordinator.active is not None and node.coordinator.active.epoch == epoch
        assert not node.coordinator.active_suspects()
        assert node.stage_host.requests_of(hid) == 0
        assert hid not in node.coordinator.members
        assert await complete(http, root(node), PROMPT) == before


async def test_a_member_cannot_act_outside_its_role(node: Node) -> None:
    async with aiohttp.ClientSession() as http:
        before = await complete(http, root(node), PROMPT)
        epoch = node.coordinator.active.epoch  # type: ignore[union-attr]
        hid = "zz-member"  # sorts after the node: a member, not the leader
        fp = node.source.fingerprint
        _, commit = plan(1001, hid, (StageRange(hid, 0, LAYERS),), fp)
        forged_leader, _ = plan(1002, node.node_id, (StageRange(hid, 0, LAYERS),), fp)
        async with hostile_link(node.port, identity(hid, fp, memory_bytes=0)) as link:
            await eventually("a member", lambda: hid in node.coordinator.members)
            flood = [opener(f"f{i}", hid, epoch) for i in range(40)]
            await send_all(
                link,
                [
                    commit,
                    forged_leader,
                    opener("big", hid, epoch, max_tokens=10**9),
                    opener("theirs", node.node_id, epoch),
                    SuspectNode(node_id=node.node_id, reporter=node.node_id, reason="x"),
                    SuspectNode(node_id=node.node_id, reporter=hid, reason="x", ttl_s=float("nan")),
                    SuspectNode(node_id=node.node_id, reporter=hid, reason="not a stage"),
                    BarrierArrive(name="plan/1", member=node.node_id),
                    TokenChunk(request_id="r", sequence_position=0, token_id=1, source_device_rank=0, plan_epoch=epoch),
                    *flood,
                ],
            )
            kinds = node.refusals.by_kind
            stage = node.stage_host.actor
            assert stage is not None
            cap = node.slots_per_owner
            assert cap < node.options.max_requests
            await eventually(
                "the flood refused past the owner's share",
                lambda: kinds["request_slots_per_owner_full"] + stage.stats.refused_per_owner == 40 - cap,
            )
            assert kinds["commit_not_from_leader"] == 1
            assert kinds["proposal_leader_mismatch"] == 1
            assert kinds["request_open_out_of_bounds"] == 1
            assert kinds["request_open_not_owner"] == 1
            assert kinds["suspect_reporter_mismatch"] == 1 and kinds["suspect_invalid"] == 1
            assert kinds["suspect_not_from_stage"] == 1 and not node.coordinator.active_suspects()
            assert kinds["barrier_for_another_node"] == 1
            assert kinds["token_not_from_last_stage"] == 1
            assert node.stage_host.requests_of(hid) == cap
            assert node.coordinator.active is not None and node.coordinator.active.epoch == epoch
            # The stage still has slots for the node's own clients.
            assert await complete(http, root(node), PROMPT) == before
        # Gone: its requests are closed, the node plans for itself again and answers as before.
        await eventually("the member's requests closed", lambda: node.stage_host.requests_of(hid) == 0)
        await eventually("a plan of the node alone", lambda: hid not in node.coordinator.members)
        assert await complete(http, root(node), PROMPT) == before


async def test_a_leader_gets_no_unacknowledged_commit_and_no_runaway_epoch(node: Node) -> None:
    """Even the leader (smallest id, same model) cannot commit what the node never acknowledged; when a
    leader whose plan names only itself leaves, the node replaces that plan at once."""
    async with aiohttp.ClientSession() as http:
        before = await complete(http, root(node), PROMPT)
        hid = "a-leader"
        fp = node.source.fingerprint
        mine = (StageRange(hid, 0, LAYERS),)
        huge, _ = plan(1 << 60, hid, mine, fp)
        _, unacked = plan(900, hid, mine, fp)
        high = node.coordinator.highest_epoch
        async with hostile_link(node.port, identity(hid, fp)) as link:
            await eventually("the leader", lambda: node.coordinator.leader == hid)
            await send_all(link, [huge, unacked])
            kinds = node.refusals.by_kind
            await eventually(
                "both refused", lambda: kinds["proposal_epoch_out_of_order"] + kinds["commit_not_acknowledged"] == 2
            )
            good, good_commit = plan(high + 5, hid, mine, fp)
            await send_all(link, [good, good_commit])
            await eventually("its plan adopted", lambda: node.coordinator.active.epoch == high + 5)  # type: ignore[union-attr]
        # The leader left with the plan's only stage: replaced whatever its epoch, and the node serves again.
        await node.coordinator.wait_plan_where(lambda p: p.stages[0].node_id == node.node_id, timeout=30)
        assert await complete(http, root(node), PROMPT) == before


async def test_a_client_cancelling_is_not_a_failure(node: Node) -> None:
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{root(node)}/v1/completions", json=body)
        await resp.content.readline()  # generating
        resp.close()  # the client goes away mid-stream
    stats = node.owner.stats
    await eventually("the request ended", lambda: not node.owner.requests)
    assert (stats.failed, stats.cancelled) == (0, 1)
