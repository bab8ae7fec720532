"""Throwaway: why is one stream slower through the batch scheduler on CUDA? (not committed)"""
import asyncio, statistics, sys, time
sys.path.insert(0, ".")
import mlx.core as mx
from exo_stable.engine import device as devices
from exo_stable.engine.batching import BatchMode
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine import scheduler as sch

drives = 0
orig = sch.BatchScheduler._drive
def counted(self):
    global drives
    drives += 1
    return orig(self)
sch.BatchScheduler._drive = counted

async def one(engine, n):
    stamps = []
    async for _ in engine.generate(list(range(100, 124)), SamplingParams(temperature=0.0), n):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return (len(gaps)) / (stamps[-1] - stamps[1]), statistics.median(gaps)

async def main():
    global drives
    kind = devices.resolve(None); devices.choose(kind); devices.activate(kind)
    model = sys.argv[1]; dt = Dtype(sys.argv[2])
    engines = {}
    for name, mode in (("fast", BatchMode.FAST), ("off", BatchMode.OFF)):
        e = SingleDeviceEngine(open_model(model), dtype=dt, batch=mode, batch_limit=16, max_requests=32)
        await e.start(); engines[name] = e
    for r in range(3):
        for name, e in engines.items():
            drives = 0
            rate, med = await one(e, 200)
            st = e.batch_stats
            print(f"round {r} {name}: {rate:.1f} tok/s, median gap {med*1000:.2f} ms, drives {drives}, steps {st.steps if st else '-'}", flush=True)
    # the scheduler's one-stream path: how long each part of a step takes
    e = engines["fast"]
    comp = e._compute
    print("lookahead depth legacy:", engines["off"].lookahead_depth)
asyncio.run(main())
