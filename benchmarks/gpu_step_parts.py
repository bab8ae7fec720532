"""Where one decode step's time goes in one process: no sockets, no event loops, only the stages' own work.

    python benchmarks/gpu_step_parts.py [--shape llama-3-8b] [--steps 48] [--rounds 3]

On seeded random weights of a published shape (``random:<shape>``), greedy, after a 448-token prompt:

1. ``whole``: the whole model, one synchronous step at a time: building the step's graph in Python, evaluating
   it (launching its kernels and waiting for the device), and reading the picked token. With the forward call
   starting the device every ``OVERLAP_LAYERS`` layers while it builds the rest (as exo-stable does on a GPU),
   and without (``whole_no_overlap``).
2. ``split``: the two halves one after the other, as two pipeline stages run them (the first half's hidden
   states to exact bytes and back, the second half picking the token), each step's graph built when its
   input comes. ``split_built_ahead``: each half's graph built before its input comes
   (``StageCompute.prepare``); ``ahead_ms`` is that building, which a pipeline does while the other stage
   computes, and ``step_ms`` leaves it out.

Rounds alternate the variants; every variant must give the same tokens (the run fails otherwise). Prints
medians in milliseconds and saves benchmarks/results/gpu_step_parts.json (``--out``). ``--shape tiny
--device cpu`` runs the same path in seconds (CI does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import random_model  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.model import LayerRange  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks  # noqa: E402
from exo_stable.engine.wire import tensor_to_bytes  # noqa: E402

Parts = dict[str, float]
Run = tuple[list[int], list[Parts]]


def _clock() -> float:
    return time.perf_counter()


def _prefill(stages: list[StageCompute], rid: str, prompt: list[int]) -> int:
    """The prompt through the stages in order (exact bytes between them); the first token."""
    for sc in stages:
        sc.open(rid, SamplingParams())
    token = -1
    for chunk in prompt_chunks(prompt):
        wire = None
        for sc in stages:
            out = sc.forward_input(rid, chunk, wire)
            if sc.layers.is_last:
                token = sc.pick(rid, out, 0)
            else:
                wire = tensor_to_bytes(out)
    return token


def _close(stages: list[StageCompute], rid: str) -> None:
    for sc in stages:
        sc.close(rid)


def whole(sc: StageCompute, rid: str, prompt: list[int], steps: int, *, overlap: bool) -> Run:
    token = _prefill([sc], rid, prompt)
    model, cache = sc._model(), sc.requests[rid].cache
    tokens, parts = [token], []
    for _ in range(steps):
        t0 = _clock()
        logits = model(mx.array([[token]], dtype=mx.int32), cache, overlap=overlap)[0, -1, :]
        t1 = _clock()
        mx.eval(logits)
        t2 = _clock()
        token = int(mx.argmax(logits).item())  # type: ignore[arg-type]
        t3 = _clock()
        tokens.append(token)
        parts.append({"build_ms": t1 - t0, "eval_ms": t2 - t1, "pick_ms": t3 - t2, "step_ms": t3 - t0})
    _close([sc], rid)
    return tokens, parts


def split(halves: list[StageCompute], rid: str, prompt: list[int], steps: int, *, ahead: bool) -> Run:
    first, last = halves
    token = _prefill(halves, rid, prompt)
    tokens, parts = [token], []
    for position in range(1, steps + 1):
        ahead_s = 0.0
        if ahead:  # a pipeline does this while the other stage computes: timed apart, left out of step_ms
            t = _clock()
            first.prepare(rid)
            last.prepare(rid)
            ahead_s = _clock() - t
        t0 = _clock()
        wire = tensor_to_bytes(first.forward_input(rid, [token]))
        t1 = _clock()
        logits = last.forward_input(rid, [], wire)
        t2 = _clock()
        token = last.pick(rid, logits, position)
        t3 = _clock()
        tokens.append(token)
        parts.append(
            {"first_ms": t1 - t0, "last_ms": t2 - t1, "pick_ms": t3 - t2, "step_ms": t3 - t0, "ahead_ms": ahead_s}
        )
    _close(halves, rid)
    return tokens, parts


def medians(parts: list[Parts]) -> dict[str, float]:
    return {k: round(1000 * statistics.median(p[k] for p in parts), 3) for k in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(random_model.SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=[d.value for d in Dtype])
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: the best available")
    parser.add_argument("--prompt-tokens", type=int, default=448)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_step_parts.json")
    args = parser.parse_args()

    kind = devices.resolve(args.device)
    devices.choose(kind)
    devices.activate(kind)
    name = f"{random_model.PREFIX}{args.shape}"
    source = open_model(name)
    n = source.spec.num_hidden_layers
    dtype = Dtype(args.dtype)
    stages = {
        "whole": StageCompute(source, LayerRange(0, n, n), dtype),
        "first": StageCompute(source, LayerRange(0, n // 2, n), dtype),
        "last": StageCompute(source, LayerRange(n // 2, n, n), dtype),
    }
    for sc in stages.values():
        sc.load()
    # Prompt ids straight from the vocabulary (the synthetic tokenizer has no words to cut up).
    prompt = [(7 * i + 11) % source.spec.vocab_size for i in range(args.prompt_tokens)]
    halves = [stages["first"], stages["last"]]
    variants: dict[str, Callable[[str], Run]] = {
        "whole": lambda rid: whole(stages["whole"], rid, prompt, args.steps, overlap=True),
        "whole_no_overlap": lambda rid: whole(stages["whole"], rid, prompt, args.steps, overlap=False),
        "split": lambda rid: split(halves, rid, prompt, args.steps, ahead=False),
        "split_built_ahead": lambda rid: split(halves, rid, prompt, args.steps, ahead=True),
    }
    for label, run in variants.items():  # warm-up: kernels compile on first use
        run(f"warm-{label}")
    parts: dict[str, list[Parts]] = {label: [] for label in variants}
    answers: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for label, run in variants.items():
            tokens, step_parts = run(f"{label}-{r}")
            parts[label].extend(step_parts)
            answers[f"{label}/{r}"] = tokens
    reference = answers["whole/0"]
    different = sorted(k for k, v in answers.items() if v != reference)
    report: dict[str, Any] = {
        "device": devices.describe(kind),
        "mlx": mx.__version__,
        "model": name,
        "dtype": dtype.value,
        "prompt_tokens": len(prompt),
        "steps": args.steps,
        "rounds": args.rounds,
        "medians_ms": {label: medians(p) for label, p in parts.items()},
        "identical": not different,
        "different": different,
    }
    print(f"{name} {dtype.value} on {report['device']}, mlx {mx.__version__}: medians of {args.rounds} x {args.steps}")
    for label, row in report["medians_ms"].items():
        print(f"  {label:<18} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    print(f"all {len(answers)} runs gave the same tokens: {report['identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")
    if different:
        raise SystemExit(f"tokens differ from the whole model's in {different}")


if __name__ == "__main__":
    main()
