"""Wire benchmark: messages/s and round-trip latency over loopback, with and without the integrity layer.

Two real PeerLinks on 127.0.0.1. For small messages, 16 KiB and 1 MiB tensors it measures

- one-way throughput: the sender streams messages, the receiver takes them in order (messages/s, MB/s);
- round-trip latency: send one message, the peer echoes it, repeat (p50/p99 in ms);

once with checksums (frame CRC32 on every frame; tensor checksum computed by the sender and verified by
the receiver) and once without (frames unchecked, tensor checksum neither computed nor verified), and
reports the integrity layer's overhead ratio. Prints a table, saves ``benchmarks/results/wire.json``.

Run: ``.venv/bin/python benchmarks/bench_wire.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exo_stable.wire.handshake import Identity, new_session_id
from exo_stable.wire.messages import Message, ResendTokens, TensorPayload
from exo_stable.wire.peerlink import LinkConfig, PeerLink
from exo_stable.wire.server import WireServer

RESULTS = Path(__file__).resolve().parent / "results" / "wire.json"


def make_factory(kind: str, checksum: bool) -> Callable[[int], Message]:
    if kind == "small":
        return lambda i: ResendTokens(request_id="tok", positions=(i,))  # a small message, as a token is
    nbytes = 16 << 10 if kind == "16KiB" else 1 << 20
    data = os.urandom(nbytes)
    shape = (nbytes // 2,)
    if checksum:
        return lambda i: TensorPayload.from_bytes("float16", shape, data, name=str(i))
    return lambda i: TensorPayload(dtype="float16", shape=shape, data=data, checksum=0, name=str(i))


def check(msg: Message, checksum: bool) -> None:
    if checksum and isinstance(msg, TensorPayload) and not msg.verify():
        raise AssertionError("tensor failed its checksum")


async def run_case(kind: str, checksum: bool, n_stream: int, n_rtt: int) -> dict[str, Any]:
    config = LinkConfig(checksum=checksum, heartbeat_interval_s=1.0, heartbeat_timeout_s=30.0)
    factory = make_factory(kind, checksum)
    b_id, a_id = Identity("b", new_session_id()), Identity("a", new_session_id())
    async with WireServer(b_id, config=config) as server:
        b = PeerLink(b_id, peer_id="a", config=config)
        server.register(b)
        async with b, PeerLink(a_id, url=server.url, peer_id="b", config=config) as a:
            await a.wait_connected(timeout=10)
            await b.wait_connected(timeout=10)

            # throughput: a streams, b consumes (and verifies)
            async def produce() -> None:
                for i in range(n_stream):
                    await a.send(factory(i), timeout=60)

            async def consume() -> None:
                for _ in range(n_stream):
                    check(await b.recv(timeout=60), checksum)

            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                tg.create_task(consume())
            await a.wait_acked(timeout=60)
            elapsed = time.perf_counter() - t0
            payload_bytes = 0 if kind == "small" else (16 << 10 if kind == "16KiB" else 1 << 20)

            # latency: ping-pong through b's echo
            async def echo() -> None:
                for _ in range(n_rtt):
                    msg = await b.recv(timeout=60)
                    check(msg, checksum)
                    await b.send(msg, timeout=60)

            rtts: list[float] = []
            async with asyncio.TaskGroup() as tg:
                tg.create_task(echo())
                for i in range(n_rtt):
                    msg = factory(i)
                    t = time.perf_counter()
                    await a.send(msg, timeout=60)
                    check(await a.recv(timeout=60), checksum)
                    rtts.append(time.perf_counter() - t)
            rtts.sort()
            stats = a.statistics()
    return {
        "message": kind,
        "checksum": checksum,
        "stream_messages": n_stream,
        "messages_per_s": n_stream / elapsed,
        "payload_MB_per_s": n_stream * payload_bytes / elapsed / 1e6,
        "rtt_samples": n_rtt,
        "rtt_p50_ms": 1000 * statistics.median(rtts),
        "rtt_p99_ms": 1000 * rtts[min(len(rtts) - 1, round(0.99 * (len(rtts) - 1)))],
        "retransmissions": stats.retransmissions,
        "corrupt_frames": stats.corrupt_frames,
    }


def checksum_microbench() -> dict[str, float]:
    out: dict[str, float] = {}
    for size, label in ((100, "100B"), (1 << 20, "1MiB")):
        data = os.urandom(size)
        reps = 20000 if size == 100 else 50
        fns: tuple[tuple[str, Callable[[bytes], object]], ...] = (
            ("crc32", zlib.crc32),
            ("blake2b8", lambda d: hashlib.blake2b(d, digest_size=8).digest()),
        )
        for name, fn in fns:
            t = time.perf_counter()
            for _ in range(reps):
                fn(data)
            out[f"{name}_{label}_us"] = (time.perf_counter() - t) / reps * 1e6
    return out


async def main(quick: bool) -> dict[str, Any]:
    plan = {"small": (20000, 2000), "16KiB": (4000, 1000), "1MiB": (200, 100)}
    if quick:
        plan = {k: (max(20, s // 10), max(10, r // 10)) for k, (s, r) in plan.items()}
    results = []
    for kind, (n_stream, n_rtt) in plan.items():
        for checksum in (True, False):
            r = await run_case(kind, checksum, n_stream, n_rtt)
            results.append(r)
            print(
                f"{kind:>6} checksum={'on ' if checksum else 'off'} {r['messages_per_s']:>9.0f} msg/s "
                f"{r['payload_MB_per_s']:>8.1f} MB/s  rtt p50 {r['rtt_p50_ms']:.3f} ms  p99 {r['rtt_p99_ms']:.3f} ms",
                flush=True,
            )
    overhead: dict[str, dict[str, float]] = {}
    for kind in plan:
        on = next(r for r in results if r["message"] == kind and r["checksum"])
        off = next(r for r in results if r["message"] == kind and not r["checksum"])
        overhead[kind] = {
            "throughput_ratio_off_over_on": off["messages_per_s"] / on["messages_per_s"],
            "rtt_p50_ratio_on_over_off": on["rtt_p50_ms"] / off["rtt_p50_ms"],
        }
        print(
            f"integrity overhead {kind:>6}: throughput x{overhead[kind]['throughput_ratio_off_over_on']:.3f}, "
            f"rtt p50 x{overhead[kind]['rtt_p50_ratio_on_over_off']:.3f}"
        )
    micro = checksum_microbench()
    print("checksum microbench (us):", {k: round(v, 3) for k, v in micro.items()})
    return {
        "benchmark": "wire",
        "quick": quick,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "results": results,
        "integrity_overhead": overhead,
        "checksum_microbench_us": micro,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages (smoke run)")
    args = parser.parse_args()
    report = asyncio.run(main(args.quick))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {RESULTS}")
