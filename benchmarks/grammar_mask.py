"""Per-token cost of a grammar's token mask on the default model's vocabulary: llguidance against outlines-core.

    python benchmarks/grammar_mask.py [--repeats 5]

For each engine installed and each grammar (any JSON object, a JSON schema), it times compiling the grammar
for this vocabulary, then walks a valid answer token by token, timing the mask at each position (the work
the last stage adds to every step of a constrained request; applying the mask to the logits is numpy's and
the same for both). xgrammar is not measured: its wheel needs torch and transformers. Prints a table and
saves benchmarks/results/grammar_mask.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from exo_stable.engine import grammar
from exo_stable.engine.store import ensure_default_model
from exo_stable.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "number"},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 2},
    },
    "required": ["city", "population_millions", "continent", "landmarks"],
    "additionalProperties": False,
}
ANSWER = '{"city":"Paris","population_millions":2.1,"continent":"Europe","landmarks":["Eiffel Tower","Louvre"]}'
CASES = {"json_object": None, "json_schema": SCHEMA}


def llguidance_run(tok: Tokenizer, schema: dict[str, Any] | None, ids: list[int]) -> dict[str, float]:
    grammar.ll_tokenizer(tok)  # built once per process (not per request): timed apart
    started = time.perf_counter()
    constraint = grammar.Constraint(grammar.json_grammar(schema), tok)
    compile_s = time.perf_counter() - started
    times = []
    for i in range(len(ids)):
        t0 = time.perf_counter()
        mask = constraint.allowed(ids[:i], tok.vocab_size)
        times.append(time.perf_counter() - t0)
        assert mask[ids[i]], f"llguidance refused token {i} of a valid answer"
    return {"compile_s": compile_s, "mask_ms": [t * 1e3 for t in times]}


def outlines_run(tok: Tokenizer, schema: dict[str, Any] | None, ids: list[int]) -> dict[str, float] | None:
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    eos = min(tok.eos_ids)
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i not in tok.eos_ids and not tok.is_special(i):
            by_bytes.setdefault(tok.token_bytes(i), []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, by_bytes)
    started = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(schema or {"type": "object"}), r"")
    index = outlines_core.Index(regex, vocabulary)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - started
    mask = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append(time.perf_counter() - t0)
        assert (int(mask[token // 32]) >> (token % 32)) & 1, "outlines-core refused a token of a valid answer"
        guide.advance(token)
    return {"compile_s": compile_s, "mask_ms": [t * 1e3 for t in times]}


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    masks = [m for r in runs for m in r["mask_ms"]]
    return {
        "compile_s_median": round(statistics.median(r["compile_s"] for r in runs), 4),
        "mask_ms_median": round(statistics.median(masks), 4),
        "mask_ms_p90": round(float(np.percentile(masks, 90)), 4),
        "mask_ms_max": round(max(masks), 4),
        "tokens": len(runs[0]["mask_ms"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tok = Tokenizer.from_gguf(ensure_default_model(progress=False))
    started = time.perf_counter()
    grammar.ll_tokenizer(tok)
    tokenizer_s = time.perf_counter() - started
    answer_object = '{"name":"Paris","a":[1,2,3],"b":{"c":true}}'
    rows: dict[str, dict[str, Any]] = {}
    for case, schema in CASES.items():
        ids = tok.encode(ANSWER if schema is not None else answer_object)
        for engine, run in (("llguidance", llguidance_run), ("outlines-core", outlines_run)):
            runs = [run(tok, schema, ids) for _ in range(args.repeats)]
            if runs[0] is None:
                print(f"{engine}: not installed, skipped")
                continue
            rows[f"{engine}/{case}"] = summary([r for r in runs if r is not None])
    print(f"vocabulary: {tok.vocab_size} tokens; llguidance's tokenizer built in {tokenizer_s:.3f}s (once)")
    print(f"{'engine/grammar':32} {'compile s':>10} {'mask ms med':>12} {'p90':>8} {'max':>8}")
    for name, row in rows.items():
        print(
            f"{name:32} {row['compile_s_median']:>10.4f} {row['mask_ms_median']:>12.4f} "
            f"{row['mask_ms_p90']:>8.4f} {row['mask_ms_max']:>8.4f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "vocab_size": tok.vocab_size,
        "llguidance_tokenizer_s": round(tokenizer_s, 4),
        "machine": platform.machine(),
        "rows": rows,
    }
    (RESULTS / "grammar_mask.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
