"""Waits that always end, and a stop that keeps its bound.

Two rules make a gateway that always stops (``PROXY_SHUTDOWN_SECONDS``, docs/operations.md):

* A loop waits with :func:`wait_event` (``asyncio.timeout`` inside), never ``asyncio.wait_for`` around a wait it
  must leave on cancel. On Python 3.11 ``wait_for`` returns the inner result when the cancel arrives in the same
  loop iteration as that result, and the cancel is lost: the dispatcher's loop then went round again, and the
  cleanup awaiting it waited for ever.
* Whoever stops tasks does so with :func:`stop_tasks`: cancel, wait within what is left of the stop's
  :class:`StopBudget`, and name in the log any task that did not end, instead of awaiting it without a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; whether it is set. A cancel always propagates."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


class StopBudget:
    """How long stopping may take in all, shared by its steps: each asks what is left before it waits.

    The clock starts at :meth:`begin` (the app's ``on_shutdown``, once the listening sockets are closed), or
    at the first :meth:`left` if nothing began it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline: float | None = None

    def begin(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.seconds

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left, less ``reserve`` (kept for the steps after this one); never below 0."""
        self.begin()
        assert self._deadline is not None
        return max(0.0, self._deadline - time.monotonic() - reserve)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], seconds: float, what: str) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``seconds`` for them to end; the ones still running (each logged by name).

    A task that ended with an error other than its cancel is logged with it, since nobody else will read it.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    done: set[asyncio.Task[Any]] = set()
    if pending:
        done, pending = await asyncio.wait(pending, timeout=seconds)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s %s failed while stopping", what, task.get_name(), exc_info=task.exception())
    for task in sorted(pending, key=lambda task: task.get_name()):
        logger.error("%s %s did not stop within %.1f s of its cancel; left running", what, task.get_name(), seconds,
                     extra={"event": "shutdown.stuck", "task": task.get_name()})
    return pending


async def join_thread(join: Callable[[], object], seconds: float) -> bool:
    """Run a blocking ``join`` (a thread's, a pool's shutdown) on a thread of its own for up to ``seconds``;
    whether it returned in time. The wait ends on time even when the join does not."""
    joining = asyncio.ensure_future(asyncio.to_thread(join))
    done, _ = await asyncio.wait({joining}, timeout=max(0.0, seconds))
    return bool(done)


class InFlight:
    """Counts the requests being handled, so a stop can wait for the last of them to record its outcome.

    aiohttp waits for handlers up to its shutdown timeout and then cancels them without waiting; a submit
    cancelled mid-call still records itself as indeterminate on its way out, and that write must reach the
    store before the store closes.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def track(self) -> InFlight:
        """``with in_flight.track():`` around one request (the object is its own context manager: no generator is
        built per request on the hot path)."""
        return self

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait(self, seconds: float) -> int:
        """Wait up to ``seconds`` for no request to be in flight; how many still are."""
        await wait_event(self._idle, seconds)
        return self.count
