"""Every background loop stops on cancel, whatever it waits on; the stop's own pieces keep their bounds; and the
suite's guards (a per-test bound with a dump, no quiet skips in CI) do what they say.

The dispatcher's hang (issue 23) was a cancel that met its wake-up: on Python 3.11 ``asyncio.wait_for`` returns
the inner result when the cancel arrives in the same few loop iterations as that result, and drops the cancel.
The first test lands a cancel at each of those iterations in turn, so it fails on the old code every time.
"""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import proxy
from proxy.config import Secret
from proxy.domain.catalog import load_catalog
from proxy.domain.queueing import load_queue_rules
from proxy.jobs.dispatcher import Dispatcher
from proxy.jobs.upstream import Upstream
from proxy.jobs.webhooks import WebhookSender, load_delivery_rules
from proxy.ops.metrics import Metrics
from proxy.ops.stopping import InFlight, StopBudget, stop_tasks, wait_event
from proxy.store import Store
from proxy.store.factory import store_at
from proxy.store.sql import one
from tests.conftest import POLICIES, ROOT, create_teams
from tests.processes import GatewayProcess
from tests.skip_guard import NO_SKIPS_ENV

PROXY = Path(proxy.__file__).parent


async def _waiting(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Until ``task`` waits on ``event`` (its loop went round once and sleeps for its wake-up)."""
    deadline = time.monotonic() + 5
    while not event._waiters:  # type: ignore[attr-defined]
        assert not task.done(), task
        assert time.monotonic() < deadline, "the loop never came to wait for its wake-up"
        await asyncio.sleep(0.01)


async def _dispatcher(store: Store) -> tuple[Callable[[], asyncio.Task[None]], asyncio.Event, Callable[[], None]]:
    upstream = Upstream("http://127.0.0.1:9", Secret("k"), timeout=1, connect_timeout=1)
    dispatcher = Dispatcher(store, upstream, load_catalog(POLICIES), load_queue_rules(POLICIES), Metrics(), StopBudget(5))
    return lambda: asyncio.create_task(dispatcher.run()), dispatcher._wake, dispatcher.poke


async def _webhook_sender(store: Store) -> tuple[Callable[[], asyncio.Task[None]], asyncio.Event, Callable[[], None]]:
    sender = WebhookSender(store, load_delivery_rules(POLICIES), Metrics(), allow_private=True)
    return lambda: asyncio.create_task(sender.run()), sender._finished, sender._finished.set


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = store_at(str(tmp_path / "loops.db"))
    await opened.open()
    yield opened
    await opened.close()


@pytest.mark.parametrize("make", [_dispatcher, _webhook_sender], ids=["dispatcher", "webhook sender"])
@pytest.mark.parametrize("iterations", range(6))
async def test_a_loop_cancelled_as_its_wake_up_lands_still_stops(store: Store, make, iterations: int) -> None:
    start, event, wake = await make(store)
    task = start()
    await _waiting(event, task)

    wake()
    for _ in range(iterations):  # the cancel lands this many loop iterations after the wake-up
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)

    assert done == {task}, f"the loop swallowed a cancel that came {iterations} iterations after its wake-up"
    assert task.cancelled()


async def test_wait_event_answers_whether_it_was_set_and_never_keeps_a_cancel() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 5) is True
    event.clear()
    for iterations in range(4):
        waiter = asyncio.create_task(wait_event(event, 30))
        await asyncio.sleep(0)
        event.set()
        for _ in range(iterations):
            await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.wait({waiter}, timeout=1)
        event.clear()
        assert waiter.done() and (waiter.cancelled() or waiter.result() is True)  # ended: set first, or cancelled


async def test_stop_tasks_names_a_task_that_will_not_stop_and_waits_no_longer_than_told(caplog) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:  # the defect this guards against: a loop that eats its cancel
                continue

    async def polite() -> None:
        await asyncio.sleep(10)

    tasks = [asyncio.create_task(stubborn(), name="stubborn"), asyncio.create_task(polite(), name="polite")]
    await asyncio.sleep(0)
    started = time.monotonic()
    left = await stop_tasks(tasks, 0.3, "background task")
    took = time.monotonic() - started

    assert [task.get_name() for task in left] == ["stubborn"]
    assert 0.3 <= took < 1.0
    assert tasks[1].cancelled()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "background task stubborn did not stop within 0.3 s of its cancel; left running"]
    release.set()
    tasks[0].cancel()
    await asyncio.wait({tasks[0]}, timeout=1)


async def test_the_stop_budget_is_shared_and_in_flight_counts_requests() -> None:
    budget = StopBudget(1.0)
    assert budget.left() == pytest.approx(1.0, abs=0.05)
    assert budget.left(reserve=0.4) == pytest.approx(0.6, abs=0.05)
    assert budget.left(reserve=5) == 0.0
    in_flight = InFlight()
    with in_flight.track(), in_flight.track():
        assert in_flight.count == 2
        assert await in_flight.wait(0.01) == 2
    assert await in_flight.wait(0.01) == 0


def _async_functions(tree: ast.AST) -> set[ast.AST]:
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            found.update(ast.walk(node))
    return found


def test_no_module_waits_in_a_way_that_can_lose_a_cancel() -> None:
    """No ``asyncio.wait_for``, no ``suppress(CancelledError)``, and no handler in async code that catches a
    cancel (bare ``except``, ``BaseException``, ``CancelledError``) without raising it again."""
    offences = []
    for path in sorted(PROXY.rglob("*.py")):
        tree = ast.parse(path.read_text())
        in_async = _async_functions(tree)
        where = path.relative_to(PROXY.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for" and getattr(node.value, "id", "") == "asyncio":
                offences.append(f"{where}:{node.lineno}: asyncio.wait_for")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "suppress" \
                    and any("CancelledError" in ast.unparse(arg) for arg in node.args):
                offences.append(f"{where}:{node.lineno}: suppress(CancelledError)")
            if isinstance(node, ast.ExceptHandler) and node in in_async:
                caught = "" if node.type is None else ast.unparse(node.type)
                catches_cancel = node.type is None or "BaseException" in caught or "CancelledError" in caught
                raises_again = any(isinstance(inner, ast.Raise) and inner.exc is None for inner in ast.walk(node))
                if catches_cancel and not raises_again:
                    offences.append(f"{where}:{node.lineno}: except {caught or '(bare)'} without raise")
    assert offences == []


async def test_a_sqlite_store_closes_within_its_bound_while_a_long_read_runs(tmp_path: Path) -> None:
    """A report over a big ledger is interrupted by the close instead of holding it (and the loop) until done."""
    store = store_at(str(tmp_path / "long.db"))
    await store.open()

    endless = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000) "
               "SELECT count(*) FROM n")  # a read that would run for minutes

    reading = asyncio.ensure_future(store._read(one, endless))  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while not store._reader_connections:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await store.close(within=2.0)
    took = time.monotonic() - started

    assert took < 2.0
    with pytest.raises(Exception, match="interrupted"):
        await reading


def _python_code(source: str) -> str:
    return textwrap.dedent(source).lstrip()


def _pytest(tmp_path: Path, source: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on one test file of ``source`` with this suite's guards, from a folder of its own."""
    (tmp_path / "test_probe.py").write_text(_python_code(source))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\ntimeout_method = signal\n")
    inherited = {name: value for name, value in os.environ.items() if name != NO_SKIPS_ENV}  # CI sets it for us
    environment = {**inherited, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.hang_guard", "-p", "tests.skip_guard",
                           "-p", "no:cacheprovider", str(tmp_path / "test_probe.py"), *args],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=90)


def test_a_hang_in_a_fixture_teardown_fails_within_the_bound_with_every_task_named(tmp_path: Path) -> None:
    started = time.monotonic()
    run = _pytest(tmp_path, """
        import asyncio
        import pytest

        async def deaf():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass

        @pytest.fixture
        async def server():
            task = asyncio.create_task(deaf(), name="deaf-loop")
            yield
            task.cancel()
            await task

        async def test_hangs_on_teardown(server):
            pass

        def test_after_it_runs():
            pass
    """, "--timeout", "2")
    took = time.monotonic() - started

    assert run.returncode == 1, run.stdout + run.stderr
    assert took < 30
    assert "Timeout after 2 s: test_probe.py::test_hangs_on_teardown" in run.stdout
    assert "--- task 'deaf-loop'" in run.stdout and "in deaf" in run.stdout
    assert "2 passed, 1 error" in run.stdout  # the hang is its teardown's error, and the next test still ran


def test_ci_mode_fails_a_run_that_skipped_anything_and_says_why(tmp_path: Path) -> None:
    source = """
        import pytest

        def test_runs():
            pass

        def test_needs_a_thing():
            pytest.skip("PostgreSQL: none here")
    """
    quiet = _pytest(tmp_path, source)
    strict = _pytest(tmp_path, source, PROXY_TEST_NO_SKIPS="1")

    assert quiet.returncode == 0, quiet.stdout
    assert strict.returncode == 1, strict.stdout
    assert "1 test(s) skipped, and PROXY_TEST_NO_SKIPS forbids it" in strict.stdout
    assert "1 x PostgreSQL: none here" in strict.stdout
    assert "PostgreSQL half:" in quiet.stdout.splitlines()[2] or any(
        line.startswith("PostgreSQL half:") for line in quiet.stdout.splitlines()[:6])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stopped_worker", [False, True], ids=["all answer", "one worker SIGSTOPped"])
async def test_serve_with_workers_passes_sigterm_on_and_exits_within_the_bound(tmp_path: Path, simulator,
                                                                               stopped_worker: bool) -> None:
    db = tmp_path / "workers.db"
    await create_teams(db, {"design": 10_000_000})
    gateway = GatewayProcess(db, simulator.url, POLICIES, "--workers", "2", PROXY_SHUTDOWN_SECONDS="3")
    await asyncio.to_thread(gateway.start)
    assert gateway.process is not None
    workers = await _worker_pids(gateway.process.pid, 2)
    await _until(lambda: gateway.stderr().count("ledger check at start-up") == 2)  # both started, handlers set
    if stopped_worker:
        os.kill(workers[0], signal.SIGSTOP)

    gateway.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.to_thread(gateway.process.wait, 15)
    took = time.monotonic() - started

    assert took <= 3.5
    alive = [pid for pid in workers if _state(pid) != "Z"]
    assert alive == []
    if stopped_worker:
        assert code == 1
        assert f"(pid {workers[0]}) did not stop in time; killed" in gateway.stderr()
    else:
        assert code == 0, gateway.stderr()[-4000:]
        assert gateway.stderr().count('"event": "shutdown"') == 2


async def _until(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _state(pid: int) -> str:
    """A process's state letter; Z (a zombie) for one that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


async def _worker_pids(parent: int, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while True:
        children = _children(parent)
        if len(children) == count:
            return sorted(int(pid) for pid in children)
        assert time.monotonic() < deadline, children
        await asyncio.sleep(0.05)
