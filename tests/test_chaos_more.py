"""More chaos on real node processes: kill the middle stage, freeze a stage, wire faults, kill during prefill.

Every scenario starts three ``exo_stable serve`` processes (default model, float32), streams a greedy request
owned by node 0 and injects one kind of fault. Each stream is bounded in time (it completes, or ends with an
explicit error event: never hangs), and its whole text must equal the uninterrupted single-device answer:
with exact replay that implies consecutive positions, nothing lost or repeated, and the text before the
fault unchanged.

The scenario functions (``scenario_*``) return a :class:`ScenarioResult` and are reused by
``benchmarks/chaos_report.py``; the tests assert on what they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_proc import free_port_block
from sse import DONE, sse_events
from test_chaos_kill import wait_stages

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
from exo_stable.tokenizer import ChatMessage

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(420)]

MAX_TOKENS = 24
SHORT = [{"role": "user", "content": "Write a haiku about the sea."}]
# About 900 tokens: prefill takes a while (two 512-token chunks through every stage).
LONG = [
    {
        "role": "user",
        "content": "Here are my harbour notes. "
        + " ".join(f"Note {i}: the tide rose {i % 7} feet near pier {i % 13} at {i % 24} o'clock." for i in range(50))
        + " Summarize the notes in one sentence.",
    }
]
HEARTBEAT_TIMEOUT_S = 5.0  # LinkConfig.heartbeat_timeout_s
WIRE_FAULTS = "drop=0.02,dup=0.02,reorder=4,corrupt=0.01,seed=7"  # no cut_every: cuts are the kill tests' job
STREAM_TIMEOUT_S = 180.0
STARTUP_TIMEOUT_S = 240.0


# -- a cluster of node processes ------------------------------------------------------------------------


@dataclass
class Cluster:
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    prefix: str
    victims: set[int] = field(default_factory=set)  # SIGKILLed on purpose: no clean exit expected
    unclean: list[str] = field(default_factory=list)  # survivors that exited non-zero or logged a traceback
    stopped: set[int] = field(default_factory=set)  # SIGSTOPped now: SIGCONT before stopping them

    def node_id(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def url(self, i: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[i]}{path}"

    def kill(self, i: int) -> None:
        self.victims.add(i)
        os.kill(self.procs[i].pid, signal.SIGKILL)

    def freeze(self, i: int) -> None:
        self.stopped.add(i)
        os.kill(self.procs[i].pid, signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGCONT)
        self.stopped.discard(i)

    def log_text(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def tails(self, n: int = 2500) -> str:
        return "\n".join(f"--- node {i} ---\n{self.log_text(i)[-n:]}" for i in range(len(self.procs)))


@contextlib.contextmanager
def cluster(
    log_dir: Path,
    n: int = 3,
    *,
    env: dict[str, str] | None = None,
    log_level: str | None = None,
    strict: bool = True,
    node_env: dict[int, dict[str, str]] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[Cluster]:
    """``n`` node processes on free ports; stopped with SIGTERM.

    The survivors must exit 0 with no traceback in their logs: asserted when ``strict``, else listed in
    ``Cluster.unclean`` for the caller to judge. ``node_env`` adds variables to single nodes' environments;
    ``args`` are extra ``serve`` flags for every node.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    base = free_port_block(n)
    ports = [base + i for i in range(n)]
    prefix = f"m{secrets.token_hex(3)}n"
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    secret = secrets.token_hex(8)
    child_env = dict(os.environ)
    for name in ("EXO_STABLE_API_KEY", "EXO_STABLE_PEERS", "EXO_STABLE_CLUSTER_SECRET", "EXO_STABLE_FAULTS"):
        child_env.pop(name, None)
    child_env.update(env or {})
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    c = Cluster(ports, procs, logs, prefix)
    try:
        for i, port in enumerate(ports):
            path = log_dir / f"{prefix}{i}.log"
            logs.append(path)
            cmd = [sys.executable, "-m", "exo_stable"]
            if log_level:
                cmd += ["--log-level", log_level]
            cmd += ["serve", "--port", str(port), "--node-id", f"{prefix}{i}", "--peers", peers]
            cmd += ["--no-discovery", "--dtype", "float32", "--cluster-secret", secret, *args]
            env_i = child_env | (node_env or {}).get(i, {})
            with path.open("wb") as log:  # the child has its own copy of the descriptor
                procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env_i)
                )
        yield c
    finally:
        for i in list(c.stopped):
            c.thaw(i)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    for i, proc in enumerate(procs):
        if i in c.victims:
            continue
        text = c.log_text(i)
        if proc.returncode != 0 or "Traceback" in text:
            c.unclean.append(f"node {i} exited {proc.returncode}:\n{text[-4000:]}")
    assert not (strict and c.unclean), "\n".join(c.unclean)


# -- streaming ------------------------------------------------------------------------------------------


@dataclass
class StreamOutcome:
    status: int = 0
    deltas: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # perf_counter of each content delta
    finishes: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: bool = False
    started: float = 0.0
    ended: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def completed(self) -> bool:
        return self.done and self.error is None and len(self.finishes) == 1

    def max_gap_s(self, after: int = 0) -> float:
        """The longest wait for a delta from delta ``after`` on (0: from the request's start)."""
        marks = [self.started, *self.times]
        gaps = [b - a for a, b in zip(marks[after:], marks[after + 1 :], strict=False)]
        return max(gaps, default=0.0)


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    max_tokens: int = MAX_TOKENS,
    *,
    on_delta: Callable[[int], None] | None = None,
    timeout_s: float = STREAM_TIMEOUT_S,
    extra: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> StreamOutcome:
    """POST a streamed greedy chat request; read it to ``[DONE]`` or an error event, within ``timeout_s``.

    Raises ``TimeoutError`` when the stream neither ends nor errors in time (a hang). ``extra`` adds body
    fields; ``stop_after``: the client goes away (closes the connection) after that many content deltas.
    """
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True} | (extra or {})
    out = StreamOutcome(started=time.perf_counter())
    async with asyncio.timeout(timeout_s):
        async with session.post(url, json=body) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = {"status": resp.status, "body": await resp.text()}
                out.ended = time.perf_counter()
                return out
            lines: list[str] = []
            async with contextlib.aclosing(sse_events(resp, lines)) as events:
                async for event in events:
                    if "error" in event:
                        out.error = event
                        continue  # [DONE] (or the end of the body) follows
                    choice = event["choices"][0]
                    if choice["delta"].get("content"):
                        out.deltas.append(choice["delta"]["content"])
                        out.times.append(time.perf_counter())
                        if on_delta is not None:
                            on_delta(len(out.deltas))
                        if stop_after is not None and len(out.deltas) >= stop_after:
                            resp.close()  # the client disconnects mid-stream
                            break
                    if choice["finish_reason"]:
                        out.finishes.append(choice["finish_reason"])
            out.done = bool(lines) and lines[-1] == DONE
    out.ended = time.perf_counter()
    return out


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            data: dict[str, Any] = await resp.json()
            return data
    except (aiohttp.ClientError, TimeoutError):
        return None


# -- reference --------------------------------------------------------------------------------------------

_REFERENCE: dict[tuple[str, int], str] = {}


async def reference(gguf: Path, messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> str:
    """The uninterrupted single-device answer (float32, greedy), computed once per prompt."""
    key = (json.dumps(messages), max_tokens)
    if key not in _REFERENCE:
        source = open_model(gguf)
        engine = SingleDeviceEngine(source, dtype=Dtype.FLOAT32)
        await engine.start()
        try:
            service = InferenceService(engine)
            prompt = source.tokenizer.encode_chat([ChatMessage(**m) for m in messages])
            result = GenerationResult(prompt_tokens=len(prompt))
            job = GenerationJob(prompt, SamplingParams(), max_tokens)
            _REFERENCE[key] = "".join([result.add(d).text async for d in service.stream(job)])
        finally:
            engine.close()
    return _REFERENCE[key]


def prompt_tokens(gguf: Path, messages: list[dict[str, str]]) -> int:
    source = open_model(gguf)
    return len(source.tokenizer.encode_chat([ChatMessage(**m) for m in messages]))


# -- scenarios ----------------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    name: str
    expected: str
    streams: list[StreamOutcome] = field(default_factory=list)
    faults_injected: int = 0
    fault_detail: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] | None = None  # the owner's /health at the end
    resume_gap_s: float | None = None  # client side: the longest wait for a delta across the fault
    notes: list[str] = field(default_factory=list)
    prefix: str = ""  # the text the client had when the fault struck
    exact: bool = True  # exact replay: every stream must equal the reference; fast: only up to the fault

    @property
    def owner_recovery(self) -> dict[str, Any]:
        if self.health is None:
            return {}
        rec: dict[str, Any] = self.health.get("owner", {}).get("recovery", {})
        return rec


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S + 60))


async def _kill_mid_stream(
    c: Cluster,
    victim: int,
    expected: str,
    name: str,
    after: int = 5,
    *,
    replay: str | None = None,
    max_tokens: int = MAX_TOKENS,
) -> ScenarioResult:
    res = ScenarioResult(name, expected)
    killed_at: list[int] = []

    def on_delta(n: int) -> None:
        if not killed_at and n >= after:
            killed_at.append(n)
            c.kill(victim)

    async with _session() as session:
        plan = await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
        assert plan["stages"][victim]["node_id"] == c.node_id(victim), plan
        extra = None if replay is None else {"exo_replay": replay}
        out = await stream_chat(
            session, c.url(0, "/v1/chat/completions"), SHORT, max_tokens, on_delta=on_delta, extra=extra
        )
        res.streams.append(out)
        assert killed_at, f"the stream ended before {after} deltas: {out}"
        res.faults_injected = 1
        res.fault_detail = {"signal": "SIGKILL", "node": victim, "after_deltas": killed_at[0], "replay": replay}
        res.prefix = "".join(out.deltas[: killed_at[0]])
        res.resume_gap_s = out.max_gap_s(after=killed_at[0])
        survivors = [p for i, p in enumerate(c.ports) if i != victim]
        after_plan = await wait_stages(session, survivors, 2, timeout_s=60)
        assert all(s["node_id"] != c.node_id(victim) for s in after_plan["stages"]), after_plan
        res.health = await get_json(session, c.url(0, "/health"))
    return res


async def scenario_kill_middle(log_dir: Path, gguf: Path, *, after: int = 5) -> ScenarioResult:
    """SIGKILL node 1 (the middle stage) after ``after`` deltas of a request owned by node 0."""
    expected = await reference(gguf, SHORT)
    with cluster(log_dir) as c:
        return await _kill_mid_stream(c, 1, expected, "sigkill_middle", after)


async def scenario_kill_last(log_dir: Path, gguf: Path, *, after: int = 5) -> ScenarioResult:
    """SIGKILL node 2 (the last stage) after ``after`` deltas (the scenario of test_chaos_kill.py)."""
    expected = await reference(gguf, SHORT)
    with cluster(log_dir) as c:
        return await _kill_mid_stream(c, 2, expected, "sigkill_last", after)


async def scenario_sigstop(
    log_dir: Path, gguf: Path, *, after: int = 5, stop_s: float = 2.2 * HEARTBEAT_TIMEOUT_S
) -> ScenarioResult:
    """SIGSTOP node 2 for ``stop_s`` mid-stream, then SIGCONT; it must come back into a 3-stage plan.

    The nodes' logs are not asserted clean here: ``notes`` lists what they logged (see
    ``test_sigstop_leaves_no_traceback_in_the_logs``).
    """
    expected = await reference(gguf, SHORT)
    res = ScenarioResult("sigstop_last", expected)
    with cluster(log_dir, strict=False) as c:
        frozen: list[int] = []
        thawed = asyncio.Event()

        async def thaw_later() -> None:
            await asyncio.sleep(stop_s)
            c.thaw(2)
            thawed.set()

        tasks: list[asyncio.Task[None]] = []

        def on_delta(n: int) -> None:
            if not frozen and n >= after:
                frozen.append(n)
                c.freeze(2)
                tasks.append(asyncio.create_task(thaw_later()))

        try:
            async with _session() as session:
                await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
                out = await stream_chat(session, c.url(0, "/v1/chat/completions"), SHORT, on_delta=on_delta)
                res.streams.append(out)
                assert frozen, f"the stream ended before {after} deltas: {out}"
                res.faults_injected = 1
                res.fault_detail = {"signal": "SIGSTOP", "node": 2, "after_deltas": frozen[0], "stopped_s": stop_s}
                res.resume_gap_s = out.max_gap_s(after=frozen[0])
                async with asyncio.timeout(stop_s + 5):
                    await thawed.wait()
                # The node returns: a later plan includes it again, and a new request on it is right too.
                back = await wait_stages(session, c.ports, 3, timeout_s=90)
                res.fault_detail["rejoined_epoch"] = back["epoch"]
                res.streams.append(await stream_chat(session, c.url(0, "/v1/chat/completions"), SHORT))
                res.health = await get_json(session, c.url(0, "/health"))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    res.notes.extend(c.unclean)
    return res


async def scenario_wire_faults(
    log_dir: Path, gguf: Path, *, spec: str = WIRE_FAULTS, requests: int = 3
) -> ScenarioResult:
    """Every link of every node injects drop/dup/reorder/corrupt faults; ``requests`` sequential requests.

    Each node's ``/health`` lists, per peer link, the faults its injector applied and the corrupt frames its
    checksum caught (the injector corrupts inbound frames right before the check: detected == injected).
    """
    expected = await reference(gguf, SHORT)
    res = ScenarioResult("wire_faults", expected)
    injected: dict[str, int] = {}
    detected = 0
    with cluster(log_dir, env={"EXO_STABLE_FAULTS": spec}) as c:
        async with _session() as session:
            await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
            for _ in range(requests):
                out = await stream_chat(session, c.url(0, "/v1/chat/completions"), SHORT)
                res.streams.append(out)
            res.health = await get_json(session, c.url(0, "/health"))
            for i in range(len(c.procs)):
                health = await get_json(session, c.url(i, "/health"))
                for peer in health["peers"].values():
                    for link in peer["links"].values():
                        detected += link["corrupt_frames"]
                        for kind, n in (link["faults_injected"] or {}).items():
                            injected[kind] = injected.get(kind, 0) + n
        res.resume_gap_s = max((s.max_gap_s(after=1) for s in res.streams), default=None)
    faults = ("dropped", "duplicated", "reordered", "corrupted")
    res.faults_injected = sum(injected.get(k, 0) for k in faults)
    res.fault_detail = {"spec": spec, "injected": injected, "corrupt_frames_detected": detected}
    return res


async def scenario_kill_in_prefill(log_dir: Path, gguf: Path, victim: int = 2) -> ScenarioResult:
    """SIGKILL a stage while it prefills a ~900-token prompt, before the first token."""
    expected = await reference(gguf, LONG)
    res = ScenarioResult("sigkill_prefill", expected)
    with cluster(log_dir) as c:
        async with _session() as session:
            await wait_stages(session, c.ports, 3, timeout_s=STARTUP_TIMEOUT_S)
            deltas_at_kill: list[int] = []
            seen: list[int] = [0]

            def on_delta(n: int) -> None:
                seen[0] = n

            async def killer() -> None:
                # Kill as soon as the victim holds the request (its prefill has started), never after a token.
                async with asyncio.timeout(60):
                    while True:
                        h = await get_json(session, c.url(victim, "/health"))
                        if h is not None and h["stage"]["open_requests"] >= 1:
                            break
                        await asyncio.sleep(0.02)
                deltas_at_kill.append(seen[0])
                c.kill(victim)

            kill_task = asyncio.create_task(killer())
            try:
                out = await stream_chat(session, c.url(0, "/v1/chat/completions"), LONG, on_delta=on_delta)
            finally:
                if not kill_task.done():
                    kill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await kill_task
            res.streams.append(out)
            assert deltas_at_kill, "the victim never opened the request"
            res.faults_injected = 1
            res.fault_detail = {"signal": "SIGKILL", "node": victim, "deltas_at_kill": deltas_at_kill[0]}
            res.resume_gap_s = out.max_gap_s(after=0)  # the request's start to its first token
            survivors = [p for i, p in enumerate(c.ports) if i != victim]
            await wait_stages(session, survivors, 2, timeout_s=60)
            res.health = await get_json(session, c.url(0, "/health"))
    return res


SCENARIOS: dict[str, Callable[[Path, Path], Awaitable[ScenarioResult]]] = {
    "sigkill_last": scenario_kill_last,
    "sigkill_middle": scenario_kill_middle,
    "sigstop_last": scenario_sigstop,
    "wire_faults": scenario_wire_faults,
    "sigkill_prefill": scenario_kill_in_prefill,
}


# -- tests ------------------------------------------------------------------------------------------------


def assert_reference(res: ScenarioResult) -> None:
    for i, out in enumerate(res.streams):
        assert out.error is None, f"stream {i} ended with an error: {out.error}"
        assert out.done, f"stream {i} has no [DONE]"
        assert len(out.finishes) == 1, f"stream {i}: finish reasons {out.finishes}"
        assert out.text == res.expected, f"stream {i}: {out.text!r} != reference {res.expected!r}"


async def test_sigkill_of_the_middle_stage_mid_stream(tmp_path: Path, default_gguf: Path) -> None:
    res = await scenario_kill_middle(tmp_path, default_gguf)
    assert_reference(res)
    assert res.health is not None and res.health["owner"]["recoveries"] >= 1, res.health


_SIGSTOP_RUN: list[ScenarioResult] = []  # one cluster run serves both SIGSTOP tests


async def _sigstop_once(log_dir: Path, gguf: Path) -> ScenarioResult:
    if not _SIGSTOP_RUN:
        _SIGSTOP_RUN.append(await scenario_sigstop(log_dir, gguf))
    return _SIGSTOP_RUN[0]


async def test_sigstop_then_sigcont_of_a_stage(tmp_path: Path, default_gguf: Path) -> None:
    res = await _sigstop_once(tmp_path, default_gguf)
    assert len(res.streams) == 2
    assert_reference(res)
    assert res.health is not None and res.health["owner"]["recoveries"] >= 1, res.health
    assert res.fault_detail["rejoined_epoch"] > 2, res.fault_detail  # a later plan holds the node again
    assert not res.notes, "\n".join(res.notes)  # no traceback in any node's log


async def test_wire_faults_during_whole_generations(tmp_path: Path, default_gguf: Path) -> None:
    res = await scenario_wire_faults(tmp_path, default_gguf)
    assert len(res.streams) == 3
    assert_reference(res)
    assert res.faults_injected > 0, f"no fault was injected: {res.fault_detail}"
    detail = res.fault_detail
    assert detail["corrupt_frames_detected"] == detail["injected"].get("corrupted", 0), detail


async def test_sigkill_of_a_stage_during_prefill(tmp_path: Path, default_gguf: Path) -> None:
    assert prompt_tokens(default_gguf, LONG) >= 600
    res = await scenario_kill_in_prefill(tmp_path, default_gguf)
    assert res.fault_detail["deltas_at_kill"] == 0, "the kill came after the first token"
    assert_reference(res)
    assert res.health is not None and res.health["owner"]["recoveries"] >= 1, res.health
