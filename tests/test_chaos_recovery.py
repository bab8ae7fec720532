"""Chaos on real node processes, part three: a crash-looping stage, a client that goes away, a kill during load.

Three ``exo_stable serve`` processes (default model, float32) on 127.0.0.1, greedy requests owned by node 0,
several requests per scenario, every stream bounded in time. For every stream: it completes (one finish
reason and ``[DONE]``) with the whole text equal to the uninterrupted single-device answer (exact replay:
that also means positions consecutive, nothing lost or repeated, the text before the fault unchanged).

- **crash loop**: node 1's stage raises on every step (``EXO_STABLE_STAGE_FAULTS=crash_every_step``). Its
  supervisor restarts it until the restart intensity is exceeded; the escalation reaches node 1's
  RecoveryManager, node 1 becomes suspect cluster-wide, the leader plans without it, and the request goes on.
- **client disconnect**: the client closes its connection mid-stream; every stage frees the request's cache,
  the nodes stay healthy and the next request is right.
- **kill during load**: node 2 is SIGKILLed while it loads its layers; the survivors commit a plan without
  it (the plan round fails at once, not at the load deadline) and serve.

The ``scenario_*`` functions are reused by ``benchmarks/chaos_report.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from test_chaos_kill import wait_stages
from test_chaos_more import (
    SHORT,
    STARTUP_TIMEOUT_S,
    ScenarioResult,
    _kill_mid_stream,
    _session,
    assert_reference,
    cluster,
    get_json,
    reference,
    stream_chat,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(420)]

REQUESTS = 2
LATE_TOKENS = 48  # replay-mode scenarios: a longer answer, killed late, so that the replay has work to do


async def wait_for(what: str, timeout_s: float, check: Any) -> Any:
    """Poll ``check()`` (other processes' state: nothing to wait on) until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")


async def scenario_replay(log_dir: Path, gguf: Path, *, mode: str, after: int = 24) -> ScenarioResult:
    """SIGKILL the last stage after ``after`` deltas of a 48-token answer; the owner replays by ``mode``."""
    expected = await reference(gguf, SHORT, LATE_TOKENS)
    with cluster(log_dir) as c:
        res = await _kill_mid_stream(c, 2, expected, f"replay_{mode}", after, replay=mode, max_tokens=LATE_TOKENS)
    res.exact = mode == "exact"
    return res


async def scenario_crash_loop(log_dir: Path, gguf: Path, *, requests: int = REQUESTS) -> ScenarioResult:
    """Node 1's stage crashes on every step until its supervisor gives up; ``requests`` requests in a row."""
    expected = await reference(gguf, SHORT)
    res = ScenarioResult("stage_crash_loop", expected)
    env = {1: {"EXO_STABLE_STAGE_FAULTS": "crash_every_step"}}
    with cluster(log_dir, node_env=env, strict=False) as c:
        async with _session() as session:
            await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
            for _ in range(requests):
                res.streams.append(await stream_chat(session, c.url(0, "/v1/chat/completions"), SHORT))
            crashed = await get_json(session, c.url(1, "/health"))
            assert crashed is not None, "node 1 stopped answering"
            res.fault_detail = {"node": 1, "supervision": crashed["supervision"]}
            res.faults_injected = crashed["supervision"]["stage_restarts"] + crashed["supervision"]["escalations"]
            res.health = await get_json(session, c.url(0, "/health"))
            res.fault_detail["plan"] = (await get_json(session, c.url(0, "/v1/cluster")) or {}).get("plan")
            if res.streams:
                res.resume_gap_s = res.streams[0].max_gap_s(after=0)
    # Node 1 logs its stage's crashes (tracebacks, on purpose); the others must be clean.
    res.notes.extend(n for n in c.unclean if not n.startswith("node 1 "))
    return res


async def scenario_client_disconnect(log_dir: Path, gguf: Path, *, requests: int = REQUESTS) -> ScenarioResult:
    """The client goes away after a few deltas, ``requests`` times; each time the next request is complete."""
    expected = await reference(gguf, SHORT)
    res = ScenarioResult("client_disconnect", expected)
    with cluster(log_dir) as c:
        async with _session() as session:
            await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
            url = c.url(0, "/v1/chat/completions")
            for i in range(requests):
                cut = await stream_chat(session, url, SHORT, stop_after=3 + i)
                assert len(cut.deltas) == 3 + i and not cut.done, cut
                res.faults_injected += 1

                async def freed() -> list[dict[str, Any]] | None:
                    healths = [await get_json(session, c.url(n, "/health")) for n in range(3)]
                    if any(h is None for h in healths):
                        return None
                    done = [h for h in healths if h is not None]
                    idle = all(h["stage"]["open_requests"] == 0 for h in done) and done[0]["owner"]["active"] == 0
                    return done if idle else None

                healths = await wait_for("every stage frees the cut request", 30, freed)
                res.fault_detail[f"cut_{i}"] = [h["stage"]["open_requests"] for h in healths]
                res.streams.append(await stream_chat(session, url, SHORT))
            res.health = await get_json(session, c.url(0, "/health"))
    return res


async def scenario_kill_during_load(log_dir: Path, gguf: Path, *, requests: int = REQUESTS) -> ScenarioResult:
    """SIGKILL node 2 while it loads layers (before any plan of its is committed); then ``requests`` requests."""
    expected = await reference(gguf, SHORT)
    res = ScenarioResult("sigkill_load", expected)
    with cluster(log_dir) as c:
        async with _session() as session:

            async def loading() -> dict[str, Any] | None:
                h = await get_json(session, c.url(2, "/health"))
                stage = None if h is None else h.get("stage")
                return h if stage is not None and stage["load_s"] == 0.0 else None

            seen = await wait_for("node 2 starts loading its layers", STARTUP_TIMEOUT_S, loading)
            c.kill(2)
            killed_at = time.perf_counter()
            res.faults_injected = 1
            res.fault_detail = {"signal": "SIGKILL", "node": 2, "plan_epoch_at_kill": seen["plan_epoch"]}
            plan = await wait_stages(session, c.ports[:2], 2, timeout_s=STARTUP_TIMEOUT_S)
            res.fault_detail["survivor_plan_s"] = round(time.perf_counter() - killed_at, 2)
            assert all(s["node_id"] != c.node_id(2) for s in plan["stages"]), plan
            for _ in range(requests):
                res.streams.append(await stream_chat(session, c.url(0, "/v1/chat/completions"), SHORT))
            res.health = await get_json(session, c.url(0, "/health"))
    return res


# -- tests ------------------------------------------------------------------------------------------------


async def test_a_stage_crashing_on_every_step_escalates_and_the_cluster_plans_without_it(
    tmp_path: Path, default_gguf: Path
) -> None:
    res = await scenario_crash_loop(tmp_path, default_gguf)
    assert len(res.streams) == REQUESTS
    assert_reference(res)
    supervision = res.fault_detail["supervision"]
    assert supervision["escalations"] >= 1, supervision  # restart intensity exceeded, escalated
    assert supervision["stage_restarts"] >= 2, supervision
    plan = res.fault_detail["plan"]
    assert plan is not None and all(not s["node_id"].endswith("n1") for s in plan["stages"]), plan
    assert res.health is not None
    recovery = res.health["owner"]["recovery"]
    assert res.health["owner"]["recoveries"] >= 1 and recovery["classes"].get("persistent", 0) >= 1, recovery
    assert not res.notes, "\n".join(res.notes)


async def test_a_client_disconnecting_mid_stream_frees_every_stage(tmp_path: Path, default_gguf: Path) -> None:
    res = await scenario_client_disconnect(tmp_path, default_gguf)
    assert res.faults_injected == REQUESTS and len(res.streams) == REQUESTS
    assert_reference(res)
    assert res.health is not None and res.health["owner"]["active"] == 0, res.health
    assert all(cut == [0, 0, 0] for cut in res.fault_detail.values()), res.fault_detail


async def test_sigkill_of_a_node_during_model_load(tmp_path: Path, default_gguf: Path) -> None:
    res = await scenario_kill_during_load(tmp_path, default_gguf)
    assert len(res.streams) == REQUESTS
    assert_reference(res)
    assert res.fault_detail["survivor_plan_s"] < 120, res.fault_detail
