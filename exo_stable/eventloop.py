"""Which asyncio event loop a node runs on: uvloop where it is installed, else the standard one.

Every hop of a pipeline step crosses event loops twice (a socket write on one node, a read and a hand-off
to the stage's actor on the next), so the loop's own cost per wake-up is on the critical path of each token.
uvloop is libuv under the same asyncio API; benchmarks/bench_gpu.py prints what one decode step spends on
the wire with either loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from exo_stable import settings

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")
ENV = settings.EVENT_LOOP.name


class EventLoopUnavailable(RuntimeError):
    """uvloop was asked for and is not installed."""


def resolve(choice: str | None = None) -> str:
    """``uvloop`` or ``asyncio`` for a choice (default: the environment's ``EXO_STABLE_EVENT_LOOP``, else auto)."""
    choice = (choice or settings.EVENT_LOOP.get()).lower()
    if choice not in CHOICES:
        raise ValueError(f"event loop {choice!r}: choose one of {', '.join(CHOICES)}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise EventLoopUnavailable("the uvloop event loop is not installed here (pip install uvloop)")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for :class:`asyncio.Runner` (``None``: the standard loop)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(resolve(choice))) as runner:
        return runner.run(main)
