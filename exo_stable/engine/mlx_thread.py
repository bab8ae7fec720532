"""One dedicated thread for all MLX work of a model (MLX streams are bound to their thread).

The asyncio side submits callables and awaits their results with a deadline; the queue between the two is
bounded, so a flood of requests waits for room instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerClosed(RuntimeError):
    """The MLX thread has stopped and takes no more work."""


class WorkerTimeout(TimeoutError):
    """A job did not finish (or could not be queued) within its deadline."""


_STOP = object()


class MlxThread:
    """A single thread that runs submitted jobs in order, one at a time."""

    def __init__(self, name: str, *, max_pending: int = 256) -> None:
        self.name = name
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self.jobs_done = 0
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting caller, never lost
                future.set_exception(exc)
            else:
                future.set_result(result)
            self.jobs_done += 1

    def submit(self, fn: Callable[..., T], *args: Any, timeout: float = 5.0) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` for the thread (blocking up to ``timeout`` for room in the queue)."""
        if self._closed:
            raise WorkerClosed(f"{self.name} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            self._jobs.put((future, fn, args), timeout=timeout)
        except queue.Full as exc:
            raise WorkerTimeout(f"{self.name}: job queue full for {timeout}s") from exc
        return future

    def call(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """Run ``fn(*args)`` on the thread and wait for it (for synchronous callers)."""
        try:
            return self.submit(fn, *args, timeout=timeout).result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise WorkerTimeout(f"{self.name}: job did not finish in {timeout}s") from exc

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:  # noqa: ASYNC109
        """Run ``fn(*args)`` on the thread; await the result for at most ``timeout`` seconds."""
        future = self.submit(fn, *args, timeout=0)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            future.cancel()  # a job still queued is skipped; one already running finishes on its own
            raise WorkerTimeout(f"{self.name}: job did not finish in {timeout}s") from exc

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the jobs already queued; wait up to ``timeout`` for the thread to end."""
        if self._closed:
            return
        self._closed = True
        # The thread is daemonic: if it never drains its queue, it dies with the process.
        with contextlib.suppress(queue.Full):
            self._jobs.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        # join() returns before the OS thread has run its C++ thread-local destructors, and MLX's take the
        # GIL: if the interpreter is finalizing by then, that thread is unwound inside a noexcept destructor
        # and the process aborts ("terminate called without an active exception"). Nothing signals the OS
        # thread's end, so wait (bounded) until /proc no longer lists it; without /proc this is a no-op.
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + timeout
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.001)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
