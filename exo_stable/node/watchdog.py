"""A stop with a deadline for the process a node owns.

A node asked to stop (SIGTERM, SIGINT) ends its tasks within its grace period and lets in-flight HTTP
requests finish within its HTTP grace (``NodeConfig.shutdown_timeout_s``); if the process is still alive
some seconds after both, a stop
is hanging, which this project does not allow: the watchdog writes where every thread is (and, as far as it
can see them, the event loop's tasks) to stderr, and ends the process with status 70 (EX_SOFTWARE), so the
hang is both bounded and explained.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading

EXIT_STATUS = 70
"""The process's exit status when its stop did not finish in time."""


def arm(deadline_s: float, loop: asyncio.AbstractEventLoop) -> threading.Timer:
    """Start the countdown (a daemon timer; cancel it if the process is to live on)."""
    timer = threading.Timer(deadline_s, _expire, args=(deadline_s, loop))
    timer.name = "stop-watchdog"
    timer.daemon = True
    timer.start()
    return timer


def _expire(deadline_s: float, loop: asyncio.AbstractEventLoop) -> None:
    out = sys.stderr
    out.write(f"exo-stable: the stop did not finish within {deadline_s:.0f}s; where each thread is:\n")
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.write("the event loop's tasks:\n")
    try:
        tasks = list(asyncio.all_tasks(loop))  # read from another thread: a best-effort snapshot
    except RuntimeError as exc:  # the set changed while it was read
        out.write(f"  (could not be listed: {exc})\n")
        tasks = []
    for task in tasks:
        task.print_stack(limit=8, file=out)
    out.write(f"exo-stable: exiting with status {EXIT_STATUS}\n")
    out.flush()
    os._exit(EXIT_STATUS)


__all__ = ["EXIT_STATUS", "arm"]
