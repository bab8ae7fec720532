"""A stop that hangs is bounded and explained: the watchdog dumps every thread's stack and the event loop's
tasks, then ends the process with status 70 (a real child process whose stop never finishes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from exo_stable.node.watchdog import EXIT_STATUS

HANGING = textwrap.dedent(
    """
    import asyncio, threading
    from exo_stable.node import watchdog

    async def stuck_forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        task = asyncio.create_task(stuck_forever(), name="stuck-task")
        await asyncio.sleep(0)
        watchdog.arm(0.5, asyncio.get_running_loop())
        threading.Event().wait(30)  # the loop's thread blocks: the stop never finishes

    asyncio.run(main())
    """
)


def test_a_hanging_stop_ends_the_process_with_the_stacks() -> None:
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-c", HANGING], check=False, capture_output=True, text=True, timeout=20, env=env
    )
    assert proc.returncode == EXIT_STATUS, proc.stderr
    assert "did not finish within 1s" in proc.stderr or "did not finish within 0s" in proc.stderr
    assert "Current thread" in proc.stderr or "Thread 0x" in proc.stderr  # faulthandler's dump
    assert "stuck_forever" in proc.stderr  # the task's stack
    assert "exiting with status 70" in proc.stderr
