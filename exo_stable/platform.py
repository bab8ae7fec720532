"""Platform facts that choose defaults: the BLAS library on Linux and the default weight dtype.

Measured on a 2-core x86_64 Linux machine with SmolLM2-135M (benchmarks/bench_engine.py): the mlx[cpu]
wheel's bundled reference BLAS makes float32 matrix products slow; with Debian's OpenBLAS preloaded,
float32 decodes faster than keeping the Q4 weights quantized, and without it the quantized weights win.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from exo_stable.modelspec import Dtype

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_REEXEC_MARK = "EXO_STABLE_BLAS_CHECKED"


def find_openblas() -> str | None:
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def openblas_loaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def maybe_reexec_with_openblas(argv: list[str]) -> None:
    """On Linux, restart this process once with OpenBLAS preloaded, if it is installed.

    ``EXO_STABLE_BLAS=reference`` keeps the wheel's own BLAS. Never returns when it re-executes.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_REEXEC_MARK) or openblas_loaded():
        return
    if os.environ.get("EXO_STABLE_BLAS", "openblas") == "reference":
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ)
    env[_REEXEC_MARK] = "1"
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else lib
    os.execve(sys.executable, [sys.executable, "-m", "exo_stable", *argv], env)


def default_dtype() -> Dtype:
    """float32 where a fast BLAS is loaded (Linux + OpenBLAS); otherwise keep the weights quantized."""
    if sys.platform.startswith("linux") and openblas_loaded():
        return Dtype.FLOAT32
    return Dtype.QUANTIZED
