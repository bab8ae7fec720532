"""``serve``'s options: the node's event loop (uvloop where installed; ``--event-loop`` /
``EXO_STABLE_EVENT_LOOP`` choose), decoding ahead, and how a crashing stage and a suspect node are treated."""

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


def test_serve_arguments_reach_the_node_configuration() -> None:
    from exo_stable.cli import node_config

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m.gguf", "--device", "cpu"])
    config = node_config(args)
    assert (config.stage_max_restarts, config.stage_restart_period_s, config.suspect_ttl_s) == (2, 30.0, 60.0)
    assert config.decode_ahead is True and config.build_ahead is True and config.batch_limit == 16
    flags = ["--stage-max-restarts", "0", "--stage-restart-period", "5", "--suspect-seconds", "7.5"]
    args = parser.parse_args(
        [
            "serve",
            "--model",
            "m.gguf",
            "--device",
            "cpu",
            "--no-decode-ahead",
            "--no-build-ahead",
            "--batch-limit",
            "1",
            *flags,
        ]
    )
    config = node_config(args)
    assert (config.stage_max_restarts, config.stage_restart_period_s, config.suspect_ttl_s) == (0, 5.0, 7.5)
    assert config.decode_ahead is False and config.build_ahead is False and config.batch_limit == 1
    for bad in (
        ["--suspect-seconds", "0"],
        ["--stage-restart-period", "-1"],
        ["--stage-max-restarts", "-1"],
        ["--batch-limit", "0"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
