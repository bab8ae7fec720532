"""A node alone with a model it cannot hold: it waits a while for peers, then stops and says what would fit.

A node given no ``--peers`` (and no forced split) whose own budget cannot hold the model waits
``--join-timeout`` seconds for a peer to join (by zeroconf, or by dialing in); if none has joined by then it
stops with the numbers and the ways out (:func:`advice`), and the process exits non-zero. A node that was
told of peers, or that a peer has joined, is part of a cluster: it keeps waiting for more nodes (its
``/health`` says why it has no plan), since the cluster may still grow to fit the model.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from exo_stable.engine.modelspec import Dtype, ModelFootprint
from exo_stable.node.config import available_memory
from exo_stable.pipeline.placement import NodeResources, PlacementError, plan_placement

if TYPE_CHECKING:
    import asyncio

    from exo_stable.node.node import Node

log = logging.getLogger(__name__)

GiB = 1 << 30

__all__ = ["ModelTooLarge", "advice", "alone_refusal", "watch_alone"]


class ModelTooLarge(RuntimeError):
    """A node that no peer joined cannot hold the model alone (the message has the numbers and the fixes)."""


def alone_refusal(node_id: str, memory_bytes: int, footprint: ModelFootprint) -> str | None:
    """Why one node with ``memory_bytes`` cannot hold the whole model, or None when it can."""
    try:
        plan_placement([NodeResources(node_id, memory_bytes)], footprint, epoch=0, model_fingerprint="")
    except PlacementError as exc:
        return str(exc)
    return None


def advice(
    footprint: ModelFootprint,
    *,
    memory_bytes: int,
    memory_given: bool,
    available_bytes: int,
    max_concurrent: int,
    context: int,
    quantized_bytes: int | None,
) -> list[str]:
    """What would let one node hold the model: each line a way out, with the numbers it rests on.

    ``quantized_bytes`` is what the model needs with its weights kept quantized (None when it is not
    quantized or already served quantized).
    """
    need = footprint.stage_bytes(0, 1, footprint.n_layers)
    kv = footprint.kv_bytes_per_layer_reserve * footprint.n_layers
    weights = need - kv
    out = []
    if memory_given and available_bytes >= need:
        out.append(
            f"give it more memory: --memory-gb {math.ceil(need / GiB * 100) / 100:.2f} or more (it offers "
            f"{memory_bytes / GiB:.2f} GiB; this machine has {available_bytes / GiB:.2f} GiB available)"
        )
    else:
        source = "--memory-gb" if memory_given else "what this machine has available"
        out.append(
            f"it needs {need / GiB:.2f} GiB and offers {memory_bytes / GiB:.2f} GiB ({source}; "
            f"{available_bytes / GiB:.2f} GiB available now)"
        )
    per_token = footprint.kv_bytes_per_layer_reserve // max(1, max_concurrent * context) * footprint.n_layers
    if kv and weights < memory_bytes and per_token:
        fits = (memory_bytes - weights) // (per_token * max_concurrent)
        out.append(
            f"reserve less KV cache: {max_concurrent} request(s) x {context} tokens take {kv / GiB:.2f} GiB; "
            f"--max-context {fits} (or fewer --max-concurrent) fits the rest"
            if fits >= 1
            else f"the KV reserve ({kv / GiB:.2f} GiB) leaves no room even for one token"
        )
    elif kv:
        out.append(
            f"the weights alone take {weights / GiB:.2f} GiB: a smaller --max-context (KV reserve "
            f"{kv / GiB:.2f} GiB now) cannot make them fit"
        )
    if quantized_bytes is not None:
        enough = "" if quantized_bytes <= memory_bytes else ", not enough by itself"
        out.append(f"keep the weights quantized: --dtype quantized needs {quantized_bytes / GiB:.2f} GiB{enough}")
    out.append(
        "or run it over more nodes: start others with --peers HOST:PORT of this one (or on a network where "
        "zeroconf reaches); --join-timeout waits longer for them"
    )
    return out


async def watch_alone(node: Node, stop: asyncio.Event) -> None:
    """If this node alone cannot hold the model, wait the join window for a peer; if none joined and no plan
    was committed, record why on ``node.gave_up`` and set ``stop``."""
    config = node.config
    footprint = node.options.footprint
    if config.peers or config.split is not None or footprint is None:
        return
    refusal = alone_refusal(node.node_id, node.memory_bytes, footprint)
    if refusal is None:
        return
    window = config.join_timeout_s
    coordinator = node.coordinator
    log.warning(
        "%s: this node alone cannot hold the model; it waits %.0fs for peers to join (--join-timeout)",
        node.node_id,
        window,
    )
    deadline = time.monotonic() + window
    while not stop.is_set():
        if coordinator.active is not None or coordinator.membership_epoch > 0:
            return  # a plan, or a peer: a cluster, which waits for more nodes as long as it takes
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await coordinator.wait_change(min(left, 5.0))
    else:
        return
    quantized = None
    if node.source.quant and config.dtype is not Dtype.QUANTIZED:
        q = node.source.footprint(Dtype.QUANTIZED, kv_tokens=config.max_concurrent * node.context_length)
        quantized = q.stage_bytes(0, 1, q.n_layers)
    ways = advice(
        footprint,
        memory_bytes=node.memory_bytes,
        memory_given=config.memory_bytes is not None,
        available_bytes=available_memory(),
        max_concurrent=config.max_concurrent,
        context=node.context_length,
        quantized_bytes=quantized,
    )
    node.gave_up = (
        f"no peer joined within {window:.0f}s and this node alone cannot hold {node.source.name} "
        f"({config.dtype}):\n{refusal}\nTo run it:\n" + "\n".join(f"  - {w}" for w in ways)
    )
    log.error("%s: no peer joined within %.0fs; stopping: this node alone cannot hold the model", node.node_id, window)
    stop.set()
