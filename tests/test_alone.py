"""A node whose memory cannot hold the model, as a user meets it with real ``exo-stable serve`` processes:
alone (no ``--peers``, no peer joining within ``--join-timeout``) it exits non-zero with the numbers and the
ways out; in a cluster (``--peers``) it keeps waiting, its ``/health`` says why, and it logs the refusal once;
a lone node that a peer joins within the window is served by the two of them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from exo_stable.engine.footprint import kv_bytes_per_token
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.node.alone import advice, alone_refusal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from nodeprocs import free_ports, stop_all, wait_for_plan

CONTEXT = 256
CONCURRENT = 2


def _whole(model: Path) -> int:
    footprint = open_model(model).footprint(Dtype.QUANTIZED, kv_tokens=CONTEXT * CONCURRENT)
    return footprint.stage_bytes(0, 1, footprint.n_layers)


def _serve(model: Path, port: int, memory_gb: float, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "exo_stable", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--node-id", f"n{port}", "--no-discovery", "--dtype", "quantized", "--memory-gb", f"{memory_gb:.4f}"]
    cmd += ["--max-context", str(CONTEXT), "--max-concurrent", str(CONCURRENT), *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("EXO_STABLE_PEERS", "EXO_STABLE_API_KEY")}
    env["EXO_STABLE_CLUSTER_SECRET"] = "alone-test-secret"
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def test_a_lone_node_too_small_exits_with_the_numbers(default_gguf: Path, tmp_path: Path) -> None:
    whole = _whole(default_gguf)
    (port,) = free_ports(1)
    log = tmp_path / "alone.log"
    proc = _serve(default_gguf, port, whole * 0.5 / 2**30, log, "--join-timeout", "1")
    try:
        status = proc.wait(timeout=120)
    finally:
        stop_all([proc], timeout=20)
    text = log.read_text(errors="replace")
    assert status != 0, text
    assert "no peer joined within 1s" in text and "cannot place 30 layers on 1 node(s)" in text, text
    assert f"the model needs {whole / 2**20:.2f} MiB ({whole} B) over 1 stage(s)" in text, text
    for fix in ("--memory-gb", "--max-context", "--peers", "--join-timeout"):
        assert fix in text, (fix, text)
    assert "Traceback" not in text, text
    assert text.count("no plan fits") == 1, text


async def _health(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, object]]:
    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
        return resp.status, await resp.json()


async def test_a_node_with_peers_waits_says_why_and_logs_the_refusal_once(default_gguf: Path, tmp_path: Path) -> None:
    whole = _whole(default_gguf)
    port, absent = free_ports(2)
    log = tmp_path / "waiting.log"
    # Its peer never comes: the node keeps waiting for it, whatever --join-timeout says.
    proc = _serve(default_gguf, port, whole * 0.5 / 2**30, log, "--join-timeout", "0", "--peers", f"127.0.0.1:{absent}")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            deadline = time.monotonic() + 120
            reason = ""
            while "cannot place" not in reason:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                assert proc.poll() is None, log.read_text(errors="replace")
                try:
                    status, body = await _health(session, port)
                    reason = str(body.get("reason", ""))
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.3)  # polling another process's HTTP endpoint
            assert status == 503 and "waiting for more nodes" in reason, body
            # Several planning wakes (the peer's dial keeps failing) must not repeat the refusal, nor stop it.
            failures = 0
            while failures < 12:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                failures = log.read_text(errors="replace").count("connect failed")
                status, body = await _health(session, port)
                assert status == 503 and "cannot place" in str(body["reason"]), body
                await asyncio.sleep(0.3)  # polling another process's log and HTTP endpoint
            assert proc.poll() is None
    finally:
        stop_all([proc], timeout=20)
    text = log.read_text(errors="replace")
    assert text.count("no plan fits") == 1, text
    assert "Traceback" not in text, text


async def test_a_lone_node_that_a_peer_joins_serves_with_it(default_gguf: Path, tmp_path: Path) -> None:
    whole = _whole(default_gguf)
    ports = free_ports(2)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # Each offers 85% of the whole: neither alone, both together. The first has no --peers; the second
    # names it. The first's join window is long enough for the second to start and dial it.
    procs = [_serve(default_gguf, ports[0], whole * 0.85 / 2**30, logs[0], "--join-timeout", "90")]
    procs.append(_serve(default_gguf, ports[1], whole * 0.85 / 2**30, logs[1], "--peers", f"127.0.0.1:{ports[0]}"))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await wait_for_plan(session, ports, procs, 120, logs)
            status, body = await _health(session, ports[0])
            assert status == 200, body
    finally:
        stop_all(procs, timeout=20)
    for log in logs:
        assert "Traceback" not in log.read_text(errors="replace")


def test_advice_names_what_would_fit(default_gguf: Path) -> None:
    source = open_model(default_gguf)
    footprint = source.footprint(Dtype.FLOAT32, kv_tokens=CONCURRENT * CONTEXT)
    need = footprint.stage_bytes(0, 1, footprint.n_layers)
    kv = footprint.kv_bytes_per_layer_reserve * footprint.n_layers
    budget = need - kv // 2  # the weights fit; half the KV reserve does not
    assert alone_refusal("n", budget, footprint) is not None
    assert alone_refusal("n", need, footprint) is None
    quantized = source.footprint(Dtype.QUANTIZED, kv_tokens=CONCURRENT * CONTEXT)
    ways = advice(
        footprint,
        memory_bytes=budget,
        memory_given=True,
        available_bytes=need * 2,
        max_concurrent=CONCURRENT,
        context=CONTEXT,
        quantized_bytes=quantized.stage_bytes(0, 1, quantized.n_layers),
    )
    text = "\n".join(ways)
    assert f"--memory-gb {need / 2**30:.2f}" in text or f"--memory-gb {need / 2**30 + 0.01:.2f}" in text, text
    # The suggested context really fits: weights + KV for CONCURRENT requests of that many tokens.
    suggested = int(text.split("--max-context ")[1].split()[0])
    per_token = kv_bytes_per_token(source.spec, 4) * footprint.n_layers
    assert 0 < suggested < CONTEXT
    assert (
        need - kv + suggested * CONCURRENT * per_token <= budget < need - kv + (suggested + 1) * CONCURRENT * per_token
    )
    assert "--dtype quantized" in text and "--peers" in text
