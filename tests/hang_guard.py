"""The suite cannot hang: a test (setup and teardown included) that outlives its bound fails, with a dump.

pytest-timeout (``timeout`` in ``pyproject.toml``, or ``@pytest.mark.timeout(N)`` on a test that needs longer)
sets the bound; this plugin replaces what it does when the bound fires. Before failing the test it writes, to
the terminal, the stack of every thread (what pytest-timeout writes itself) *and* every task of the event loop
that was running, each with its name and where it is suspended: a fixture teardown that waits for a task
which never ends shows which task that is and what it waits on. Then the test fails, the loop it was running
is left behind, and the run goes on with the next test instead of eating CI's time.

The alarm is set again each time it fires: the teardown that follows a failed test (pytest-asyncio cancelling
the loop's leftover tasks and waiting for them) can hang in its turn on a task that ignores cancels, and then
fails the same way. After :data:`MOST_FIRES` the run itself is ended (exit status 1) with a last dump: a red
run in minutes rather than a hung one.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import pytest
import pytest_timeout

#: How many times one test's bound may fire (its call, then each teardown step that hangs) before the run ends.
MOST_FIRES = 3


def describe_tasks(loop: asyncio.AbstractEventLoop) -> str:
    """Every unfinished task of ``loop``: its name, its coroutine, and the stack it is suspended in."""
    out = io.StringIO()
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    out.write(f"{len(tasks)} unfinished task(s) on the event loop\n")
    for task in sorted(tasks, key=lambda task: task.get_name()):
        out.write(f"--- task {task.get_name()!r}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    return out.getvalue()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own thread method: it dumps the threads and ends the run

    fired = 0

    def fire(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        nonlocal fired
        fired += 1
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title=f"Timeout after {settings.timeout:g} s: {item.nodeid} (stall {fired})")
        pytest_timeout.dump_stacks(terminal)
        loop = asyncio._get_running_loop()
        if loop is not None:
            terminal.sep("~", title="Tasks of the running event loop")
            terminal.write(describe_tasks(loop))
        terminal.sep("+", title="Timeout")
        if fired >= MOST_FIRES:
            terminal.line(f"{item.nodeid} cannot be stopped after {fired} stalls: ending the run", red=True)
            terminal.flush()
            sys.stdout.flush()
            os._exit(1)
        signal.setitimer(signal.ITIMER_REAL, settings.timeout)  # whatever runs next for this test is bounded too
        pytest.fail(f"Timeout after {settings.timeout:g} s (the stacks of every thread and task are above)")

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
