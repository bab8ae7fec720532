"""Every environment variable exo-stable reads, in one place: its name, what it sets and its default.

The command line (``cli.py``) is where a node's settings come from; these variables give some of its options
their defaults, or set what has no option (fault injection for the chaos tests, where state and models are
kept). Each one is read when the part that uses it starts (a node, a link, a stage), never at import, so a
test can set one before it starts a node; a part that takes an ``environ`` mapping reads that one instead.
Nothing else in the package reads ``os.environ`` (the platform module copies it to re-run the process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: ``get`` reads it as set (``default`` when unset or empty)."""

    name: str
    doc: str
    default: str = ""

    def get(self, environ: Mapping[str, str] | None = None) -> str:
        return (os.environ if environ is None else environ).get(self.name) or self.default

    def is_set(self, environ: Mapping[str, str] | None = None) -> bool:
        return self.name in (os.environ if environ is None else environ)


LOG: Final = Variable("EXO_STABLE_LOG", "the log level (--log-level's default)", "INFO")
LOG_FORMAT: Final = Variable("EXO_STABLE_LOG_FORMAT", "text or json log lines (--log-format's default)")
API_KEY: Final = Variable("EXO_STABLE_API_KEY", "the key API clients must send (--api-key's default)")
PEERS: Final = Variable("EXO_STABLE_PEERS", "host:port of peers to dial, comma-separated (--peers's default)")
ADVERTISE: Final = Variable("EXO_STABLE_ADVERTISE", "the address peers are told to dial (--advertise's default)")
CLUSTER_SECRET: Final = Variable(
    "EXO_STABLE_CLUSTER_SECRET", "the cluster's shared secret (kept out of the command line, which `ps` shows)"
)
STATE_DIR: Final = Variable("EXO_STABLE_STATE_DIR", "where a node keeps its generated cluster secret")
HOME: Final = Variable("EXO_STABLE_HOME", "where downloaded models are kept (default ~/.cache/exo-stable)")
EVENT_LOOP: Final = Variable("EXO_STABLE_EVENT_LOOP", "uvloop, asyncio or auto (--event-loop's default)", "auto")
FAULTS: Final = Variable("EXO_STABLE_FAULTS", "faults injected on every link's inbound frames (chaos tests)")
INTEGRITY_FAULTS: Final = Variable(
    "EXO_STABLE_INTEGRITY_FAULTS", "faults injected into activations and tokens at the stages (chaos tests)"
)
STAGE_FAULTS: Final = Variable("EXO_STABLE_STAGE_FAULTS", "stage crashes injected (chaos tests)")
HF_HUB_OFFLINE: Final = Variable("HF_HUB_OFFLINE", "1: never ask the Hugging Face hub, use its cache only")
HF_HUB_CACHE: Final = Variable("HF_HUB_CACHE", "the Hugging Face hub's cache directory")
LD_PRELOAD: Final = Variable("LD_PRELOAD", "libraries preloaded: the engine re-runs itself with OpenBLAS on Linux")
XDG_STATE_HOME: Final = Variable("XDG_STATE_HOME", "where STATE_DIR defaults to (its exo-stable folder)")

VARIABLES: Final = (
    LOG,
    LOG_FORMAT,
    API_KEY,
    PEERS,
    ADVERTISE,
    CLUSTER_SECRET,
    STATE_DIR,
    HOME,
    EVENT_LOOP,
    FAULTS,
    INTEGRITY_FAULTS,
    STAGE_FAULTS,
    HF_HUB_OFFLINE,
    HF_HUB_CACHE,
    LD_PRELOAD,
    XDG_STATE_HOME,
)
