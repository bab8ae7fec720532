"""A seeded fault injector *inside* a stage: corruption that no frame or chunk checksum can see. Pure.

The link's injector (``wire/faults.py``) corrupts frames on the wire, where the frame CRC32 catches them.
These faults happen before any checksum is computed, as a bad memory cell or a faulty compute unit would,
and exist to prove what each validation level catches (``pipeline/levels.py``):

=============  ==============================================================================================
act_compute    probability that a step's forward output (hidden states, non-last stages) comes out wrong, before
               any checksum; transient: a recomputation of the step is right. Caught by strict's spot check.
act_memory     probability that a hidden-state tensor is corrupted in the sender's memory after strict's source
               checksum was taken but before it is framed. Caught by strict's end-to-end activation checksum.
token          probability that a token is altered after the last stage sealed it, on its way to the owner
               (the copy kept for resends stays right). Caught by light's token checksum.
stage          only the stage at this index is affected (-1: every stage)
skip           the first ``skip`` eligible events pass untouched
limit          at most this many faults in all (0: no limit)
seed           seed of the random generator (default 0)
=============  ==============================================================================================

A corrupted tensor has one element's highest exponent bit flipped (float32, float16 and bfloat16 alike), so
the value changes by many orders of magnitude; a corrupted token has its lowest bit flipped (still within the
vocabulary). Off unless configured: tests pass a :class:`StageFaultConfig`; whole nodes read the environment
variable ``EXO_STABLE_INTEGRITY_FAULTS``, e.g. ``act_memory=1,stage=0,skip=3,limit=1``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from exo_stable import settings
from exo_stable.wire.faults import parse_spec

ENV_VAR: Final = settings.INTEGRITY_FAULTS.name

_ELEMENT_BYTES: Final = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class StageFaultConfig:
    act_compute: float = 0.0
    act_memory: float = 0.0
    token: float = 0.0
    stage: int = -1
    skip: int = 0
    limit: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("act_compute", "act_memory", "token"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"stage fault rate {name}={value} is not within [0, 1]")
        if self.skip < 0 or self.limit < 0 or self.stage < -1:
            raise ValueError("skip and limit must be >= 0, stage >= -1")

    @property
    def active(self) -> bool:
        return bool(self.act_compute or self.act_memory or self.token)

    def applies_to(self, stage: int) -> bool:
        return self.active and self.stage in (-1, stage)

    @classmethod
    def parse(cls, spec: str) -> StageFaultConfig:
        """Parse ``key=value,key=value``; unknown keys and bad values raise ``ValueError``."""
        return cls(**parse_spec(spec, cls, "stage fault"))  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StageFaultConfig | None:
        spec = settings.INTEGRITY_FAULTS.get(environ).strip()
        return cls.parse(spec) if spec else None


@dataclass(slots=True)
class StageFaultCounts:
    act_compute: int = 0
    act_memory: int = 0
    token: int = 0

    @property
    def total(self) -> int:
        return self.act_compute + self.act_memory + self.token

    def as_dict(self) -> dict[str, int]:
        return {"act_compute": self.act_compute, "act_memory": self.act_memory, "token": self.token}


class StageFaults:
    """Decides, event by event, whether to inject; every fault is counted in :attr:`counts`."""

    def __init__(self, config: StageFaultConfig, *, stage: int) -> None:
        self.config = config
        self.enabled = config.applies_to(stage)
        self.counts = StageFaultCounts()
        self._rng = random.Random(f"{config.seed}:stage{stage}")
        self._eligible = 0

    def _fire(self, rate: float) -> bool:
        if not self.enabled or rate <= 0.0:
            return False
        cfg = self.config
        if cfg.limit and self.counts.total >= cfg.limit:
            return False
        self._eligible += 1
        if self._eligible <= cfg.skip:
            return False
        return self._rng.random() < rate

    def compute(self, dtype: str, data: bytes) -> bytes:
        """A forward output as the faulty compute produced it (``data`` itself, mostly)."""
        if not self._fire(self.config.act_compute):
            return data
        self.counts.act_compute += 1
        return self._flip(dtype, data)

    def memory(self, dtype: str, data: bytes) -> bytes:
        """A hidden-state tensor as it sits in the sender's memory when it is framed."""
        if not self._fire(self.config.act_memory):
            return data
        self.counts.act_memory += 1
        return self._flip(dtype, data)

    def token(self, token_id: int) -> int:
        """A sealed token's id as it leaves for the owner."""
        if not self._fire(self.config.token):
            return token_id
        self.counts.token += 1
        return token_id ^ 1

    def _flip(self, dtype: str, data: bytes) -> bytes:
        size = _ELEMENT_BYTES.get(dtype, 1)
        count = len(data) // size
        if count == 0:
            return data
        buf = bytearray(data)
        element = self._rng.randrange(count)
        buf[element * size + size - 1] ^= 0x40  # little-endian: the high byte holds the exponent's top bit
        return bytes(buf)
