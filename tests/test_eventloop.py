"""The node's event loop: uvloop where installed (``--event-loop`` / ``EXO_STABLE_EVENT_LOOP`` choose)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import uvloop

from exo_stable import eventloop
from exo_stable.cli import build_parser


def test_auto_prefers_uvloop_and_a_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.resolve(None) == "uvloop"
    assert eventloop.resolve("asyncio") == "asyncio"
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.resolve(None) == "asyncio", "the environment chooses when the command line does not"
    assert eventloop.resolve("uvloop") == "uvloop", "the command line wins over the environment"
    with pytest.raises(ValueError, match="choose one of auto, uvloop, asyncio"):
        eventloop.resolve("trio")


def test_without_uvloop_auto_falls_back_and_asking_for_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.resolve("auto") == "asyncio"
    with pytest.raises(eventloop.EventLoopUnavailable, match="pip install uvloop"):
        eventloop.resolve("uvloop")


def test_run_uses_the_chosen_loop() -> None:
    async def loop_type() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    assert eventloop.run(loop_type(), "uvloop") is uvloop.Loop
    assert not issubclass(eventloop.run(loop_type(), "asyncio"), uvloop.Loop)


def test_serve_takes_the_event_loop_flag() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--event-loop", "asyncio"]).event_loop == "asyncio"
    assert parser.parse_args(["serve"]).event_loop is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--event-loop", "trio"])
