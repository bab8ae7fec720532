"""Snapshots for health pages: an actor's state and counters at one instant.

Statistics are plain frozen dataclasses built on demand (``ref.statistics()``); reading them never blocks
and never changes the actor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ActorState(enum.Enum):
    """Where an actor is in its life."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ActorStats:
    """One actor's health: lifecycle state, mailbox depth and counters."""

    name: str
    path: str
    state: ActorState
    mailbox_depth: int
    mailbox_size: int
    waiting_senders: int
    processed: int
    ask_errors: int
    asks_dropped: int
    tasks: int
    restarts: int
    exit_reason: str | None
