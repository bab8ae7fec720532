"""Is each operation of a llama step bit-for-bit repeatable on this device? (exo-stable's promise needs it.)

    python benchmarks/gpu_determinism.py [--repeats 50]

Runs each operation at Llama-3-8B decode/prefill shapes many times on the same inputs and counts the runs
whose output bytes differ from the first. Prints a table; saves benchmarks/results/gpu_determinism.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]


def cases() -> dict[str, Callable[[], mx.array]]:
    k = iter(mx.random.split(mx.random.key(0), 32))

    def rnd(*shape: int, scale: float = 1.0) -> mx.array:
        return (mx.random.normal(shape, key=next(k)) * scale).astype(mx.bfloat16)

    x1, x1f, xp = rnd(1, 4096), rnd(1, 14336), rnd(513, 4096)
    w_up, w_down, w_head = rnd(14336, 4096, scale=0.02), rnd(4096, 14336, scale=0.01), rnd(128256, 4096, scale=0.02)
    q, kk, v = rnd(1, 32, 1, 128), rnd(1, 8, 600, 128), rnd(1, 8, 600, 128)
    qw, qs, qb = mx.quantize(w_up, group_size=64, bits=4)
    qhw, qhs, qhb = mx.quantize(w_head, group_size=64, bits=4)
    norm_w = mx.ones((4096,), dtype=mx.bfloat16)
    x3 = x1.reshape(1, 1, 4096)
    mx.eval(x1, x1f, xp, w_up, w_down, w_head, q, kk, v, qw, qs, qb, qhw, qhs, qhb)
    return {
        "matmul 1x4096 @ 4096x14336": lambda: x1 @ w_up.T,
        "matmul 1x14336 @ 14336x4096": lambda: x1f @ w_down.T,
        "matmul 1x4096 @ 4096x128256 (head)": lambda: x1 @ w_head.T,
        "matmul 1x1x4096 @ 4096x14336 (3-d, as Linear)": lambda: x3 @ w_up.T,
        "matmul 513x4096 @ 4096x14336 (prefill)": lambda: xp @ w_up.T,
        "quantized_matmul 1x4096 @ q4 14336": lambda: mx.quantized_matmul(x1, qw, qs, qb, group_size=64, bits=4),
        "quantized_matmul 1x4096 @ q4 head": lambda: mx.quantized_matmul(x1, qhw, qhs, qhb, group_size=64, bits=4),
        "rms_norm 1x4096": lambda: mx.fast.rms_norm(x1, norm_w, 1e-5),
        "sdpa decode 32q/8kv x 600": lambda: mx.fast.scaled_dot_product_attention(q, kk, v, scale=128**-0.5),
        "softmax 1x128256": lambda: mx.softmax(x1 @ w_head.T, axis=-1),
        "argmax head": lambda: mx.argmax(x1 @ w_head.T),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_determinism.json")
    args = parser.parse_args()
    rows = {}
    for name, fn in cases().items():
        first = fn()
        mx.eval(first)
        ref = bytes(memoryview(first.view(mx.uint16) if first.dtype == mx.bfloat16 else first))
        differ = 0
        for _ in range(args.repeats):
            out = fn()
            mx.eval(out)
            got = bytes(memoryview(out.view(mx.uint16) if out.dtype == mx.bfloat16 else out))
            differ += got != ref
        rows[name] = differ
        print(f"{name:<48} {differ:>3} of {args.repeats} runs differ from the first", flush=True)
    report = {"device": str(mx.default_device()), "mlx": mx.__version__, "repeats": args.repeats, "differing": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
