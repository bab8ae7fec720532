"""Platform facts that choose defaults: the BLAS library on Linux and the default weight dtype.

Measured on a 2-core x86_64 Linux machine with SmolLM2-135M (benchmarks/bench_engine.py): the mlx[cpu]
wheel's bundled reference BLAS makes float32 matrix products slow; with Debian's OpenBLAS preloaded,
float32 decodes faster than keeping the Q4 weights quantized, and without it the quantized weights win.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from exo_stable import settings
from exo_stable.engine.modelspec import Dtype

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
    return "openblas" in settings.LD_PRELOAD.get()


def gpu_index(argv: list[str]) -> int | None:
    """The value of ``--gpu N`` in a command line (read before argparse: it must act before CUDA starts)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--gpu="):
            value = arg.removeprefix("--gpu=")
        elif arg == "--gpu" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return int(value) if value.isdigit() else None  # argparse reports a bad value
    return None


def reexec_env(argv: list[str], environ: dict[str, str]) -> dict[str, str] | None:
    """The environment this process should restart with, or None when it is right as it is.

    On Linux, OpenBLAS is preloaded when installed (``EXO_STABLE_BLAS=reference`` keeps the wheel's own
    BLAS); ``--gpu N`` sets ``CUDA_VISIBLE_DEVICES=N`` (CUDA reads it once, when it starts).
    """
    if environ.get(_REEXEC_MARK):
        return None
    env = dict(environ)
    changed = False
    gpu = gpu_index(argv)
    if gpu is not None and environ.get("CUDA_VISIBLE_DEVICES") != str(gpu):
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        changed = True
    if (
        sys.platform.startswith("linux")
        and "openblas" not in environ.get("LD_PRELOAD", "")
        and environ.get("EXO_STABLE_BLAS", "openblas") != "reference"
        and (lib := find_openblas()) is not None
    ):
        env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else lib
        changed = True
    if not changed:
        return None
    env[_REEXEC_MARK] = "1"
    return env


def maybe_reexec(argv: list[str]) -> None:
    """Restart this process once with :func:`reexec_env`'s environment. Never returns when it does."""
    env = reexec_env(argv, dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "exo_stable", *argv], env)


def default_dtype(device: str = "cpu") -> Dtype:
    """bfloat16 on a GPU; float32 where a fast BLAS is loaded (Linux + OpenBLAS); else keep weights quantized.

    On the H200, bfloat16 decoded faster than 4-bit weights (README's GPU section has the figures).
    """
    if device == "gpu":
        return Dtype.BFLOAT16
    if sys.platform.startswith("linux") and openblas_loaded():
        return Dtype.FLOAT32
    return Dtype.QUANTIZED
