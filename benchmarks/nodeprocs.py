"""Node processes for benchmarks: free ports, waiting for a cluster's plan, stopping them all."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def wait_for_plan(
    session: aiohttp.ClientSession,
    ports: Sequence[int],
    procs: Sequence[subprocess.Popen[bytes]],
    timeout: float,  # noqa: ASYNC109
    logs: Sequence[Path] = (),
) -> None:
    """Until every node reports the same committed plan of ``len(ports)`` stages; a node that exits fails it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        epochs: set[int | None] = set()
        for port in ports:
            try:
                async with session.get(f"http://127.0.0.1:{port}/v1/cluster") as r:
                    plan = (await r.json())["plan"]
                    epochs.add(plan["epoch"] if plan and len(plan["stages"]) == len(ports) else None)
            except aiohttp.ClientError:
                epochs.add(None)
        if None not in epochs and len(epochs) == 1:
            return
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                tail = logs[i].read_text()[-2000:] if i < len(logs) else ""
                raise RuntimeError(f"a node exited with {proc.returncode} during startup {tail}")
        await asyncio.sleep(0.5)  # polling other processes' HTTP endpoints
    raise TimeoutError(f"{len(ports)} node(s) not ready in {timeout}s")


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM every node, then SIGKILL any that has not exited within ``timeout``."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def sse_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST a streaming request; yield each ``data:`` event until ``[DONE]``. An error event raises."""
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if "error" in event or "choices" not in event:
                raise RuntimeError(f"the stream ended with {event}")
            yield event
