"""DistributedBarrier on its own: release, bounded retries that name who is missing, a refusal, and the
SyncState a node reports in /health while its plan round's barrier is open."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from exo_stable.pipeline.barrier import BarrierFailed, BarrierTimeout, DistributedBarrier
from exo_stable.pipeline.statistics import ClusterStatistics, NodeStatistics
from exo_stable.wire.linkconfig import PeersStatistics
from exo_stable.wire.messages import BarrierStatus


async def test_releases_once_every_member_arrived() -> None:
    barrier = DistributedBarrier("plan-3", frozenset({"a", "b"}))
    waiting = asyncio.create_task(barrier.sync_with_timeout(5.0, 0))
    assert barrier.arrive("a") and not barrier.arrive("a") and not barrier.arrive("stranger")
    assert not await barrier.validate_sync_state()
    barrier.arrive("b")
    result = await waiting
    assert result.attempts == 1 and barrier.status is BarrierStatus.RELEASED
    assert await barrier.validate_sync_state()


async def test_retries_then_times_out_naming_the_missing() -> None:
    retried: list[tuple[frozenset[str], int]] = []

    async def on_retry(missing: frozenset[str], attempt: int) -> None:
        retried.append((missing, attempt))

    barrier = DistributedBarrier("plan-4", frozenset({"a", "b"}), on_retry=on_retry)
    barrier.arrive("a")
    with pytest.raises(BarrierTimeout) as caught:
        await barrier.sync_with_timeout(0.05, 2)
    assert caught.value.missing == frozenset({"b"}) and "missing: b" in str(caught.value)
    assert retried == [(frozenset({"b"}), 1), (frozenset({"b"}), 2)]
    assert barrier.status is BarrierStatus.TIMED_OUT


async def test_a_refusal_fails_it_at_once() -> None:
    barrier = DistributedBarrier("plan-5", frozenset({"a", "b"}))
    barrier.arrive("b", ok=False, detail="out of memory")
    with pytest.raises(BarrierFailed, match="b: out of memory"):
        await barrier.sync_with_timeout(5.0, 3)
    assert barrier.status is BarrierStatus.FAILED


async def test_an_open_barrier_is_reported_in_health() -> None:
    barrier = DistributedBarrier("plan-6", frozenset({"n1", "n0"}))
    waiting = asyncio.create_task(barrier.sync_with_timeout(30.0, 0))
    await asyncio.sleep(0)  # the attempt has begun: its deadline is set
    state = barrier.state()
    assert state.barrier_status is BarrierStatus.PENDING and 0 < state.timeout_remaining <= 30.0
    stats = NodeStatistics(
        node_id="n0",
        cluster=ClusterStatistics(plan=None, membership_epoch=1, members=frozenset({"n0", "n1"}), barrier=state),
        peers=PeersStatistics(),
        owner=SimpleNamespace(as_dict=dict),  # type: ignore[arg-type]  # only the cluster part is read here
    )
    shown = stats.as_dict()["plan_barrier"]
    assert shown["name"] == "plan-6" and shown["status"] == "pending" and shown["devices"] == ["n0", "n1"]
    barrier.arrive("n0")
    barrier.arrive("n1")
    await waiting
    assert barrier.state().barrier_status is BarrierStatus.RELEASED
