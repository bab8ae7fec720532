"""A seeded, deterministic fault injector for link frames. Pure: no IO, no clock.

It sits between the socket and the frame codec on the *receiving* side of each link, so every fault it
injects meets the receiver's detectors at once: a corrupted frame goes straight to the checksum check, and
"corruptions detected == corruptions injected" holds exactly (faults sit on the inbound path; a frame that
a cut discards is counted as such). Handshake frames are not touched (a handshake has its own timeout).

Configure with :class:`FaultConfig` in tests, or for whole-node runs with the environment variable
``EXO_STABLE_FAULTS``, e.g. ``drop=0.02,dup=0.02,reorder=4,corrupt=0.01,cut_every=2000,seed=7``. Keys:

=========  ===========================================================================
drop       probability a frame is lost
dup        probability a frame is delivered twice
reorder    window: frames are held in a buffer of this size and released in random order
corrupt    probability one byte of a frame is flipped (XOR with a random non-zero byte)
delay      probability a frame is held back ``delay_ms`` before it is processed
delay_ms   how long a delayed frame waits (default 5)
cut_every  the connection is cut at every n-th inbound frame (that frame is lost)
seed       seed of the random generator (default 0)
=========  ===========================================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Final

from exo_stable import settings

ENV_VAR: Final = settings.FAULTS.name


def parse_spec(spec: str, config: type, what: str) -> dict[str, float | int]:
    """``key=value,key=value`` into the fields of the dataclass ``config`` (ints where the field is one)."""
    known = {f.name: f.type for f in fields(config)}
    values: dict[str, float | int] = {}
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"bad {what} item {item!r}; known keys: {', '.join(known)}")
        values[key] = int(raw) if known[key] in (int, "int") else float(raw)
    return values


@dataclass(frozen=True, slots=True)
class FaultConfig:
    drop: float = 0.0
    dup: float = 0.0
    reorder: int = 0
    corrupt: float = 0.0
    delay: float = 0.0
    delay_ms: float = 5.0
    cut_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "dup", "corrupt", "delay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {name}={value} is not within [0, 1]")
        if self.reorder < 0 or self.cut_every < 0 or self.delay_ms < 0:
            raise ValueError("reorder, cut_every and delay_ms must be >= 0")

    @property
    def active(self) -> bool:
        return bool(self.drop or self.dup or self.reorder > 1 or self.corrupt or self.delay or self.cut_every)

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse ``key=value,key=value``; unknown keys and bad values raise ``ValueError``."""
        return cls(**parse_spec(spec, cls, "fault"))  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultConfig | None:
        spec = settings.FAULTS.get(environ).strip()
        return cls.parse(spec) if spec else None


@dataclass(slots=True)
class FaultCounts:
    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    delayed: int = 0
    cuts: int = 0
    discarded_on_cut: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class Outcome:
    """What the link does with one inbound frame: wait ``delay`` s, process ``frames``, then cut if asked."""

    frames: list[bytes] = field(default_factory=list)
    delay: float = 0.0
    cut: bool = False


class FaultInjector:
    """Applies :class:`FaultConfig` to a stream of frames; every fault is counted in :attr:`counts`."""

    def __init__(self, config: FaultConfig, *, stream: str = "") -> None:
        self.config = config
        self.counts = FaultCounts()
        # A string seed is hashed deterministically (sha512) by random.Random.
        self._rng = random.Random(f"{config.seed}:{stream}")
        self._held: list[bytes] = []

    @property
    def holding(self) -> int:
        return len(self._held)

    def process(self, frame: bytes) -> Outcome:
        cfg = self.config
        rng = self._rng
        c = self.counts
        c.frames += 1
        out = Outcome()
        if cfg.cut_every and c.frames % cfg.cut_every == 0:
            c.cuts += 1
            c.discarded_on_cut += 1 + len(self._held)
            self._held.clear()
            out.cut = True
            return out
        if cfg.drop and rng.random() < cfg.drop:
            c.dropped += 1
            return out
        copies = [frame]
        if cfg.dup and rng.random() < cfg.dup:
            c.duplicated += 1
            copies.append(frame)
        if cfg.delay and rng.random() < cfg.delay:
            c.delayed += 1
            out.delay = cfg.delay_ms / 1000.0
        if cfg.reorder > 1:
            for copy in copies:
                self._held.append(copy)
                while len(self._held) >= cfg.reorder:
                    i = rng.randrange(len(self._held))
                    if i != 0:
                        c.reordered += 1
                    out.frames.append(self._release(self._held.pop(i)))
        else:
            out.frames.extend(self._release(copy) for copy in copies)
        return out

    def flush(self) -> list[bytes]:
        """Release every held frame in random order (the link calls this when the socket goes idle)."""
        held = self._held
        self._rng.shuffle(held)
        self._held = []
        return [self._release(f) for f in held]

    def discard(self) -> int:
        """The connection ended: held frames are lost with it. Returns how many."""
        n = len(self._held)
        self.counts.discarded_on_cut += n
        self._held.clear()
        return n

    def _release(self, frame: bytes) -> bytes:
        cfg = self.config
        if cfg.corrupt and frame and self._rng.random() < cfg.corrupt:
            self.counts.corrupted += 1
            buf = bytearray(frame)
            buf[self._rng.randrange(len(buf))] ^= self._rng.randrange(1, 256)
            return bytes(buf)
        return frame
