"""Benchmark: actors' ``tell`` and ``ask`` against a plain ``asyncio.Queue`` hand-off, in the same run.

Scenarios (each run for the actor runtime and for the baseline, same message counts, same bound of 1024):

- ``tell``: one producer streams N messages into one consumer; throughput is N over the time until the
  consumer has handled the last one; latency is enqueue → handler start (it includes queueing behind up to
  1024 earlier messages, for both sides alike).
- ``ask``: one caller makes N sequential request/reply round trips; latency is the round trip.
- ``ask_x32``: 32 concurrent callers share N round trips; throughput under concurrency.

The baseline is what an actor replaces: ``asyncio.Queue(maxsize=1024)`` read by one consumer task, with a
future per request for replies. The two sides run alternately, ``--repeats`` times each;
each figure is the median. Prints a table and writes
``benchmarks/results/actors.json``.

    python benchmarks/bench_actors.py [--tells 200000] [--asks 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors import Actor, ActorSystem  # noqa: E402

CAPACITY = 1024
CONCURRENCY = 32
DEADLINE = 30.0

Result = dict[str, float]


def summarize(n: int, elapsed_s: float, latencies_ns: list[int]) -> Result:
    lat = sorted(latencies_ns)
    return {
        "msgs_per_s": n / elapsed_s,
        "p50_us": lat[len(lat) // 2] / 1e3,
        "p99_us": lat[min(len(lat) - 1, (len(lat) * 99) // 100)] / 1e3,
    }


# ---- the actor side ------------------------------------------------------------------------------------


class Sink(Actor[int]):
    """Records enqueue → handle latency for stamped messages; signals after the n-th."""

    mailbox_size = CAPACITY

    def __init__(self, n: int, done: asyncio.Event, latencies: list[int]) -> None:
        self.n = n
        self.done = done
        self.latencies = latencies

    async def receive(self, message: int) -> None:
        self.latencies.append(time.perf_counter_ns() - message)
        if len(self.latencies) == self.n:
            self.done.set()


class Echo(Actor[int]):
    """Replies with the message."""

    mailbox_size = CAPACITY

    async def receive(self, message: int) -> int:
        return message


async def actor_tell(n: int) -> Result:
    done = asyncio.Event()
    latencies: list[int] = []
    async with ActorSystem("bench") as system:
        ref = await system.spawn(Sink(n, done, latencies))
        clock = time.perf_counter_ns
        t0 = time.perf_counter()
        for _ in range(n):
            await ref.tell(clock())
        async with asyncio.timeout(DEADLINE):
            await done.wait()
        elapsed = time.perf_counter() - t0
    return summarize(n, elapsed, latencies)


async def actor_ask(n: int, concurrency: int) -> Result:
    latencies: list[int] = []
    async with ActorSystem("bench") as system:
        ref = await system.spawn(Echo())
        clock = time.perf_counter_ns

        async def client(count: int) -> None:
            for _ in range(count):
                t = clock()
                await ref.ask(t, timeout=DEADLINE)
                latencies.append(clock() - t)

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(client(n // concurrency))
        elapsed = time.perf_counter() - t0
    return summarize(len(latencies), elapsed, latencies)


# ---- the asyncio.Queue baseline ------------------------------------------------------------------------


async def queue_tell(n: int) -> Result:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=CAPACITY)
    latencies: list[int] = []

    async def consumer() -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            stamp = await queue.get()
            latencies.append(clock() - stamp)

    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(consumer())
        for _ in range(n):
            await queue.put(clock())
    elapsed = time.perf_counter() - t0
    return summarize(n, elapsed, latencies)


async def queue_ask(n: int, concurrency: int) -> Result:
    queue: asyncio.Queue[tuple[int, asyncio.Future[int]] | None] = asyncio.Queue(maxsize=CAPACITY)
    latencies: list[int] = []
    loop = asyncio.get_running_loop()

    async def server() -> None:
        while (item := await queue.get()) is not None:
            message, reply = item
            if not reply.done():
                reply.set_result(message)

    async def client(count: int) -> None:
        clock = time.perf_counter_ns
        for _ in range(count):
            t = clock()
            reply: asyncio.Future[int] = loop.create_future()
            await queue.put((t, reply))
            async with asyncio.timeout(DEADLINE):
                await reply
            latencies.append(clock() - t)

    async with asyncio.TaskGroup() as outer:
        outer.create_task(server())
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(client(n // concurrency))
        elapsed = time.perf_counter() - t0
        await queue.put(None)
    return summarize(len(latencies), elapsed, latencies)


# ---- driver --------------------------------------------------------------------------------------------


async def paired_medians(
    repeats: int, actor_run: Callable[[], Awaitable[Result]], queue_run: Callable[[], Awaitable[Result]]
) -> tuple[Result, Result]:
    """Run the two sides alternately (so load from elsewhere hits both alike); median of each figure."""
    actor: list[Result] = []
    queue: list[Result] = []
    for _ in range(repeats):
        gc.collect()
        actor.append(await actor_run())
        gc.collect()
        queue.append(await queue_run())

    def median(results: list[Result]) -> Result:
        return {key: statistics.median(r[key] for r in results) for key in results[0]}

    return median(actor), median(queue)


async def main(tells: int, asks: int, repeats: int) -> dict[str, Any]:
    scenarios: dict[str, tuple[Callable[[], Awaitable[Result]], Callable[[], Awaitable[Result]]]] = {
        "tell": (lambda: actor_tell(tells), lambda: queue_tell(tells)),
        "ask": (lambda: actor_ask(asks, 1), lambda: queue_ask(asks, 1)),
        f"ask_x{CONCURRENCY}": (lambda: actor_ask(asks, CONCURRENCY), lambda: queue_ask(asks, CONCURRENCY)),
    }
    # warm up both paths once
    await actor_tell(10_000)
    await queue_tell(10_000)
    await actor_ask(2_000, 1)
    await queue_ask(2_000, 1)
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tells": tells,
        "asks": asks,
        "repeats": repeats,
        "mailbox_size": CAPACITY,
        "scenarios": {},
    }
    for name, (actor_run, queue_run) in scenarios.items():
        actor, queue = await paired_medians(repeats, actor_run, queue_run)
        report["scenarios"][name] = {
            "actor": actor,
            "asyncio_queue": queue,
            "throughput_ratio": actor["msgs_per_s"] / queue["msgs_per_s"],
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"python {report['python']} on {report['platform']}; median of {report['repeats']} runs")
    header = f"{'scenario':<10} {'impl':<14} {'msgs/s':>12} {'p50 µs':>9} {'p99 µs':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, row in report["scenarios"].items():
        for impl in ("actor", "asyncio_queue"):
            r = row[impl]
            ratio = f"{row['throughput_ratio']:.2f}" if impl == "actor" else ""
            print(f"{name:<10} {impl:<14} {r['msgs_per_s']:>12,.0f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {ratio:>7}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tells", type=int, default=200_000)
    parser.add_argument("--asks", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "actors.json")
    args = parser.parse_args()
    report = asyncio.run(main(args.tells, args.asks, args.repeats))
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    cli()
