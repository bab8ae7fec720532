"""What a node is told to be (:class:`NodeConfig`, from the command line) and what that implies before it
starts: the memory it offers (:func:`available_memory`) and the dtype it serves by default
(:func:`serving_dtype`). No IO beyond reading the machine's free memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from exo_stable.api.server import ApiConfig
from exo_stable.cluster.security import SecretSource
from exo_stable.engine.loader import ModelSource
from exo_stable.engine.modelspec import Dtype
from exo_stable.pipeline.levels import DEFAULT_SPOT_CHECK_FRACTION, ValidationLevel
from exo_stable.pipeline.recovery import ReplayMode

log = logging.getLogger(__name__)

BYTES_PER_PARAM = {Dtype.FLOAT32: 4.0, Dtype.BFLOAT16: 2.0, Dtype.FLOAT16: 2.0, Dtype.QUANTIZED: 0.6}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    model: Path
    dtype: Dtype
    host: str = "127.0.0.1"
    port: int = 52415
    api: ApiConfig = field(default_factory=ApiConfig)
    max_concurrent: int = 8
    max_queue: int = 32
    node_id: str | None = None
    peers: tuple[tuple[str, int], ...] = ()
    advertise: tuple[str, int | None] | None = None
    """``--advertise host[:port]``: the address peers are told to dial (port None: the bound port)."""
    discovery: bool = False
    cluster_secret: bytes | None = None
    cluster_auth: SecretSource = "given"
    """Where the secret came from (cluster/security.py): the node says so once it listens."""
    cluster_secret_path: Path | None = None
    memory_bytes: int | None = None
    max_context: int | None = None
    dtype_auto: bool = False
    """No ``--dtype`` given: :func:`serving_dtype` may keep a quantized model quantized."""
    """``--max-context``: the longest request (prompt + answer) served; the KV reserve of placement is sized
    for ``max_concurrent`` requests of this many tokens (default: the model's context)."""
    split: tuple[int, ...] | None = None
    max_stages: int | None = None
    shutdown_timeout_s: float = 10.0
    peer_timeout_s: float = 1.5
    """A peer link silent this long (no data, no heartbeat) is down; heartbeats go every quarter of it."""
    replay: ReplayMode = ReplayMode.EXACT
    stage_max_restarts: int = 2
    stage_restart_period_s: float = 30.0
    suspect_ttl_s: float = 60.0
    validation: ValidationLevel = ValidationLevel.LIGHT
    spot_check_fraction: float = DEFAULT_SPOT_CHECK_FRACTION
    adaptive_validation: bool = True
    decode_ahead: bool = True
    build_ahead: bool = True
    max_batch: int = 16  # a stage's decode steps of this many requests share one forward call (1: one at a time)
    peer_forget_s: float = 60.0  # a peer down this long leaves nothing behind (cluster/peers.py)


def available_memory() -> int:
    """What this machine can give now: MemAvailable on Linux (free memory plus reclaimable caches)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def serving_dtype(source: ModelSource, config: NodeConfig) -> Dtype:
    """The default dtype: the platform's, except that a quantized model stays quantized where its expanded
    weights would not fit this node's budget (the weights alone: the choice must not hang on how much the KV
    reserve of a busy machine leaves, or nodes alike would choose differently)."""
    if config.dtype is Dtype.QUANTIZED or not source.quant:
        return config.dtype
    budget = config.memory_bytes or available_memory()
    whole = source.footprint(config.dtype, kv_tokens=0)
    needed = whole.stage_bytes(0, 1, whole.n_layers)
    if needed <= budget:
        return config.dtype
    log.info(
        "%s stays quantized: %s would take %.2f GiB, this node offers %.2f GiB",
        source.name,
        config.dtype,
        needed / 2**30,
        budget / 2**30,
    )
    return Dtype.QUANTIZED
