"""Structured logs: JSON lines with the request id, from the formatter and from a real ``exo-stable serve``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_proc import ServerProcess

from exo_stable.cli import build_parser
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.logs import REQUEST_ID, LogFormat, configure, default_format, safe


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer for the test's length; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure("INFO", LogFormat.JSON, buffer)
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_of_their_task(json_logs: io.StringIO) -> None:
    log = logging.getLogger("exo_stable.test")

    async def request(rid: str, started: asyncio.Event, other: asyncio.Event) -> None:
        REQUEST_ID.set(rid)
        started.set()
        await other.wait()  # the two requests interleave: each task keeps its own id
        log.info("working on %s", rid)

    async def both() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
            tg.create_task(request("chatcmpl-a", a, b))
            tg.create_task(request("chatcmpl-b", b, a))

    log.info("before any request")
    asyncio.run(both())
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, *middle, last = lines(json_logs)
    assert first["message"] == "before any request" and "request_id" not in first
    assert first["level"] == "INFO" and first["logger"] == "exo_stable.test"
    assert first["ts"].endswith("+00:00")
    assert sorted((m["request_id"], m["message"]) for m in middle) == [
        ("chatcmpl-a", "working on chatcmpl-a"),
        ("chatcmpl-b", "working on chatcmpl-b"),
    ]
    assert last["level"] == "ERROR" and "ValueError: boom" in last["exc"]


def test_the_format_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_STABLE_LOG_FORMAT", raising=False)
    assert build_parser().parse_args(["serve"]).log_format == "text"
    assert build_parser().parse_args(["serve", "--log-format", "json"]).log_format == "json"
    assert build_parser().parse_args(["--log-format", "json", "serve"]).log_format == "json"
    monkeypatch.setenv("EXO_STABLE_LOG_FORMAT", "JSON")
    assert default_format() is LogFormat.JSON
    assert build_parser().parse_args(["serve"]).log_format == "json"
    assert build_parser().parse_args(["serve", "--log-format", "text"]).log_format == "text"
    monkeypatch.setenv("EXO_STABLE_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="EXO_STABLE_LOG_FORMAT"):
        default_format()


async def test_a_served_request_logs_json_lines_with_its_id(default_gguf: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf", default_gguf, layers=2, seed=1)
    server = ServerProcess.start("--model", str(model), "--log-format", "json")
    try:
        async with aiohttp.ClientSession() as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
            async with http.post(f"{server.base_url}/chat/completions", json=body) as resp:
                assert resp.status == 200
                response_id = (await resp.json())["id"]
    finally:
        status = server.stop()
        log = server.log()
        server.log_path.unlink(missing_ok=True)
    assert status == 0, log[-3000:]
    records = []
    for line in log.splitlines():
        if line.startswith("exo-stable:"):
            continue  # the command's own status lines (printed, not logged)
        records.append(json.loads(line))  # every log line is one JSON object
    assert records, log
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["message"] == "event loop: uvloop" for r in records), "a node runs on uvloop where it is installed"
    mine = [r for r in records if r.get("request_id") == response_id]
    assert mine, f"no log line carries {response_id}: {records}"
    assert any("completion tokens" in r["message"] for r in mine)
    assert all(r.get("request_id") in (None, response_id) for r in records)


def test_a_peer_supplied_newline_cannot_forge_a_log_line() -> None:
    """A node id from a hello with a newline in it stays on its own line, escaped (text format)."""
    stream = io.StringIO()
    handler = configure("info", "text", stream)
    try:
        forged = "evil\n2026-01-01 00:00:00,000 CRITICAL exo_stable: node on fire\r\x1b[2J"
        logging.getLogger("exo_stable.test").warning("refused a connection from %s", forged)
        logging.getLogger("exo_stable.test").warning("cut: %s", safe("x" * 1000, limit=50))
        try:
            raise ValueError(forged)
        except ValueError:
            logging.getLogger("exo_stable.test").exception("an exception from a peer's string")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) > 3 and all(line.startswith("| ") for line in lines[3:]), lines
    lines = lines[:2]
    assert "CRITICAL" not in lines[0].split(" ", 3)[2] and "\\n2026" in lines[0] and "\\x1b" in lines[0]
    assert lines[1].endswith("...(1000 chars)")
