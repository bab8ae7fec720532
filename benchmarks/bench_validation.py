"""The cost of each validation level: decode tokens/s at off, light and strict, measured in the same run.

    python benchmarks/bench_validation.py [--rounds 8] [--max-tokens 32] [--split 15,15] [--tiny LAYERS]

Starts a two-node in-process cluster (two nodes of this process over real sockets on 127.0.0.1; the default
model in float32, or a random tiny llama with ``--tiny``), then runs greedy requests round after round, the
three levels in a different order each round, and takes each level's median decode rate (tokens after the
first, over the time from the first token to the last). Prints the figures and each level's overhead
against ``off`` (goal: light under 2%, strict under 10%) and saves benchmarks/results/validation.json.
Adaptive strictness is off here, so that each request runs at the level it asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.pipeline.levels import AdaptiveConfig, AdaptiveStrictness, ValidationLevel  # noqa: E402
from exo_stable.pipeline.service import GenerationJob, GenerationResult  # noqa: E402
from exo_stable.verify.run import InProcessCluster, in_process_cluster  # noqa: E402

LEVELS = (ValidationLevel.OFF, ValidationLevel.LIGHT, ValidationLevel.STRICT)
GOALS = {"light": 0.02, "strict": 0.10}
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle in simple words.",
    "Write a poem about autumn leaves.",
]


async def one_request(
    cluster: InProcessCluster, prompt_ids: list[int], level: ValidationLevel, max_tokens: int
) -> dict[str, float]:
    node = cluster.nodes[0]
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    job = GenerationJob(prompt_ids, SamplingParams(), max_tokens, validation=level)
    first: float | None = None
    last = 0.0
    started = time.perf_counter()
    async with asyncio.timeout(300), aclosing(node.owner.stream(job)) as deltas:
        async for delta in deltas:
            result.add(delta)
            now = time.perf_counter()
            if first is None and result.completion_tokens > 0:
                first = now
            last = now
    tokens = result.completion_tokens
    assert first is not None and tokens > 1, "no tokens came back"
    return {
        "tokens": tokens,
        "ttft_s": first - started,
        "decode_tok_s": (tokens - 1) / (last - first) if last > first else 0.0,
    }


def check_costs(hidden_size: int, vocab_size: int, repeat: int = 2000) -> dict[str, float]:
    """Seconds per decode token that each level's checks add over ``off``, timed alone (min of 5 repeats).

    Per token of a two-stage pipeline: light seals the token on the last stage and verifies it at the owner,
    verifies one activation chunk's and tensor's CRC32 on the receiving stage, and checks the delta's UTF-8;
    strict adds the sender's source checksum, its comparison, and the EncodingValidator on the delta. (The
    spot check's cost is recomputation, a fraction of the compute, so it is not in these figures.)
    """
    from exo_stable.pipeline.levels import DeltaChecker
    from exo_stable.pipeline.validators import TokenValidator
    from exo_stable.wire.messages import TokenChunk, tensor_checksum
    from exo_stable.wire.validation import TokenTransferValidator

    data = bytes(range(256)) * (hidden_size * 4 // 256 + 1)
    data = data[: hidden_size * 4]
    sealer = TokenTransferValidator()
    validator = TokenValidator(vocab_size, request_id="bench-request-0", plan_epoch=1)
    token = TokenChunk(
        request_id="bench-request-0", sequence_position=17, token_id=4242, source_device_rank=1, plan_epoch=1
    )
    light_delta, strict_delta = DeltaChecker(ValidationLevel.LIGHT), DeltaChecker(ValidationLevel.STRICT)
    text = " the quick"

    def light() -> None:
        sealed = sealer.seal(token)
        validator.validate_token(sealed)
        tensor_checksum(data)
        tensor_checksum(data)
        light_delta.check(text)

    def strict_extra() -> None:
        _ = tensor_checksum(data) == 0
        strict_delta.check(text)

    def per_call(fn: Any) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeat):
                fn()
            best = min(best, (time.perf_counter() - started) / repeat)
        return best

    light_s = per_call(light)
    return {"light_s_per_token": light_s, "strict_s_per_token": light_s + per_call(strict_extra)}


def stage_counters(cluster: InProcessCluster) -> dict[str, int]:
    out = {"spot_checks": 0, "spot_check_mismatches": 0, "bad_activations": 0}
    for node in cluster.nodes:
        actor = node.stage_host.actor
        if actor is not None:
            out["spot_checks"] += actor.stats.spot_checks
            out["spot_check_mismatches"] += actor.stats.spot_check_mismatches
            out["bad_activations"] += actor.stats.bad_activations
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from exo_stable.engine.loader import open_model

    if args.tiny:
        from exo_stable.engine.store import ensure_default_model
        from exo_stable.engine.synthetic import tiny_gguf

        model = tiny_gguf(
            Path(tempfile.mkdtemp()) / "tiny.gguf", ensure_default_model(progress=False), layers=args.tiny
        )
        label = f"tiny random llama, {args.tiny} layers"
    else:
        from exo_stable.engine.store import ensure_default_model

        model = ensure_default_model(progress=False)
        label = "SmolLM2-135M-Instruct"
    spec = open_model(model).spec
    layers = spec.num_hidden_layers
    split = tuple(int(x) for x in args.split.split(",")) if args.split else (layers // 2, layers - layers // 2)
    tokenizer = open_model(model).tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    runs: dict[str, list[dict[str, float]]] = {level.value: [] for level in LEVELS}
    rng = random.Random(args.seed)
    async with in_process_cluster(model, Dtype.FLOAT32, split, name="benchval") as cluster:
        owner = cluster.nodes[0].owner
        owner.adaptive = AdaptiveStrictness(
            owner.config.validation, AdaptiveConfig(enabled=False), clock=time.monotonic
        )
        fraction = owner.config.spot_check_fraction
        print(f"bench_validation: {label}, split {split}, spot-check fraction {fraction}", file=sys.stderr)
        await one_request(cluster, prompts[0], ValidationLevel.LIGHT, 8)  # warm up
        for r in range(args.rounds):
            order = list(LEVELS)
            rng.shuffle(order)
            for level in order:
                before = stage_counters(cluster)
                run = await one_request(cluster, prompts[r % len(prompts)], level, args.max_tokens)
                after = stage_counters(cluster)
                run |= {k: after[k] - before[k] for k in after}
                runs[level.value].append(run)
                print(
                    f"  round {r + 1} {level.value:>6}: {run['decode_tok_s']:6.2f} tok/s, {int(run['tokens'])} tokens, "
                    f"{int(run['spot_checks'])} spot checks",
                    file=sys.stderr,
                )
    levels: dict[str, Any] = {}
    for name, rs in runs.items():
        levels[name] = {
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 3),
            "decode_tok_s_runs": [round(r["decode_tok_s"], 3) for r in rs],
            "ttft_s": round(statistics.median(r["ttft_s"] for r in rs), 4),
            "tokens": int(sum(r["tokens"] for r in rs)),
            "spot_checks": int(sum(r["spot_checks"] for r in rs)),
            "spot_check_mismatches": int(sum(r["spot_check_mismatches"] for r in rs)),
        }
    off = levels["off"]["decode_tok_s"]
    overhead = {name: round(1.0 - levels[name]["decode_tok_s"] / off, 4) for name in ("light", "strict")}
    # Paired: each round's level against the same round's off (slow drifts of a shared machine cancel).
    paired = {
        name: round(
            statistics.median(
                1.0 - r["decode_tok_s"] / o["decode_tok_s"] for r, o in zip(runs[name], runs["off"], strict=True)
            ),
            4,
        )
        for name in ("light", "strict")
    }
    costs = check_costs(spec.hidden_size, spec.vocab_size)
    token_s = 1.0 / off
    estimated = {
        "light": round(costs["light_s_per_token"] / token_s, 5),
        "strict": round(costs["strict_s_per_token"] / token_s + fraction, 5),
    }
    return {
        "benchmark": "validation levels",
        "model": label,
        "dtype": "float32",
        "nodes": 2,
        "split": list(split),
        "cluster": "in-process nodes over real sockets on 127.0.0.1",
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "spot_check_fraction": fraction,
        "levels": levels,
        "overhead": overhead,
        "overhead_paired": paired,
        "check_cost_us_per_token": {
            "light": round(1e6 * costs["light_s_per_token"], 2),
            "strict": round(1e6 * costs["strict_s_per_token"], 2),
        },
        "overhead_estimated": estimated,
        "ratio_to_off": {name: round(levels[name]["decode_tok_s"] / off, 4) for name in ("off", "light", "strict")},
        "goal": GOALS,
        "meets_goal": {name: overhead[name] < goal for name, goal in GOALS.items()},
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "note": "overhead = 1 - decode_tok_s(level) / decode_tok_s(off) over the medians of the rounds; "
        "overhead_paired: the median over rounds of the same ratio within each round; negative means faster than "
        "off (noise of a shared machine). overhead_estimated: the checks' own time per token (timed alone) over "
        "off's time per token, plus, for strict, the spot-check fraction (an upper bound on recomputation's "
        "share of compute).",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--split", help="layers per stage, e.g. 15,15 (default: half and half)")
    parser.add_argument("--tiny", type=int, default=0, help="use a random tiny llama with this many layers")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the levels in each round")
    parser.add_argument("--out", type=Path, default=RESULTS / "validation.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"validation levels, {report['model']}, 2 nodes {report['split']}, {report['rounds']} rounds:")
    for name in ("off", "light", "strict"):
        level = report["levels"][name]
        extra = f", {level['spot_checks']} spot checks" if name == "strict" else ""
        over = (
            ""
            if name == "off"
            else f"  overhead {100 * report['overhead'][name]:+.2f}% (goal < {100 * GOALS[name]:.0f}%)"
        )
        print(f"  {name:>6}: {level['decode_tok_s']:7.2f} decode tok/s{over}{extra}")
    for name in ("light", "strict"):
        print(
            f"  {name:>6}: paired overhead {100 * report['overhead_paired'][name]:+.2f}%, checks alone "
            f"{report['check_cost_us_per_token'][name]:.1f} us/token, estimated overhead "
            f"{100 * report['overhead_estimated'][name]:.3f}%"
        )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
