"""One exo-stable node serving its model over HTTP until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from exo_stable.api.server import ApiConfig, create_app
from exo_stable.engine import SingleDeviceEngine
from exo_stable.loader import open_model
from exo_stable.modelspec import Dtype
from exo_stable.service import InferenceService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    model: Path
    dtype: Dtype
    host: str = "127.0.0.1"
    port: int = 52415
    api: ApiConfig = field(default_factory=ApiConfig)
    max_concurrent: int = 8
    shutdown_timeout_s: float = 10.0


async def serve(config: NodeConfig, *, ready: asyncio.Event | None = None) -> None:
    """Load the model, serve the API, and stop cleanly on SIGINT/SIGTERM."""
    source = open_model(config.model)
    engine = SingleDeviceEngine(source, dtype=config.dtype, max_requests=config.max_concurrent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await engine.start()
        service = InferenceService(engine, max_active=config.max_concurrent)
        runner = web.AppRunner(
            create_app(service, config.api), shutdown_timeout=config.shutdown_timeout_s, access_log=None
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = runner.addresses[0][1] if runner.addresses else config.port
            print(
                f"exo-stable: serving {source.name} ({config.dtype}) on http://{config.host}:{port}/v1",
                flush=True,
            )
            if config.api.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("serving on %s without an API key: anyone who reaches it can use it", config.host)
            if ready is not None:
                ready.set()
            await stop.wait()
            print("exo-stable: shutting down", file=sys.stderr, flush=True)
        finally:
            await runner.cleanup()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        engine.close()
