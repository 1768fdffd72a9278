"""Several gateway processes on one database: one set of books, one upstream job per identical request, one status
call per interval per job, and a SIGKILLed replica's work finished by the others.

Three ``pixazo-proxy serve`` processes share a PostgreSQL database (and, for ``--workers 2``, two workers share a
SQLite file) in front of one simulator; requests are spread over them round-robin, all at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.simulator.server import Fault, Simulator
from proxy.store.factory import store_at
from tests.conftest import POLICIES, TEXT_PATH, Receiver, auth, create_teams, ledger_mismatches, policies_with
from tests.databases import Peek, ThrowawayCluster, wait_until_accepting, with_database
from tests.processes import GatewayProcess, stop_all

PRICE = 420_000  # the default text-to-video submit: 6 s at 720p


@pytest.fixture
def postgres_url(postgres_server) -> AsyncIterator[str]:
    server, reason = postgres_server
    if server is None:
        pytest.skip(f"PostgreSQL: {reason}")
    url = server.create()
    yield url
    server.drop(url)


Replicas = Callable[..., Awaitable[list[GatewayProcess]]]


@pytest.fixture
async def replicas(simulator: Simulator) -> AsyncIterator[Replicas]:
    started: list[GatewayProcess] = []

    async def start(location: str, count: int = 3, teams: dict[str, int] | None = None, policies: Path = POLICIES,
                    *serve_args: str, **env: str) -> list[GatewayProcess]:
        await create_teams(location, teams if teams is not None else {"design": 50_000_000})
        found = [GatewayProcess(location, simulator.url, policies, *serve_args, **env)  # type: ignore[attr-defined]
                 for _ in range(count)]
        for process in found:
            await asyncio.to_thread(process.start)
            started.append(process)
        return found

    yield start
    await asyncio.to_thread(stop_all, started)


async def _spread(urls: list[str], count: int, body: Callable[[int], dict[str, Any]],
                  headers: dict[str, str] | None = None) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> tuple[int, Any]:
            async with http.post(urls[i % len(urls)] + TEXT_PATH, json=body(i), headers=headers or auth()) as response:
                return response.status, await response.json()
        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _status(url: str, handle: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v2/requests/status/{handle}", headers=auth()) as response:
        assert response.status == 200
        return await response.json()


async def _until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _books_are_closed(db: Peek) -> bool:
    return db.rows("SELECT COUNT(*) FROM reservations WHERE state = 'open'") == [(0,)]


async def test_a_budget_race_over_three_replicas_admits_exactly_what_it_holds(postgres_url: str, replicas: Replicas,
                                                                              simulator: Simulator) -> None:
    gateways = await replicas(postgres_url, teams={"design": 5 * PRICE})

    answers = await _spread([g.url for g in gateways], 30, lambda i: {"prompt": f"distinct {i}"})

    codes = [code for code, _ in answers]
    assert (codes.count(202), codes.count(402)) == (5, 25)
    assert len(simulator.calls_of("submit")) == 5
    db = Peek(postgres_url)
    await _until(lambda: _books_are_closed(db))
    assert db.rows("SELECT spent_micros, reserved_micros FROM budget_totals WHERE scope = 'team:design'") == [
        (5 * PRICE, 0)]
    assert await ledger_mismatches(postgres_url) == []


async def test_twelve_identical_submits_over_three_replicas_make_one_upstream_job(postgres_url: str,
                                                                                 replicas: Replicas,
                                                                                 simulator: Simulator) -> None:
    gateways = await replicas(postgres_url)
    simulator.settings.processing_seconds = 0.5

    answers = await _spread([g.url for g in gateways], 12, lambda i: {"prompt": "the same lighthouse"})

    assert [code for code, _ in answers] == [202] * 12
    assert len(simulator.calls_of("submit")) == 1
    handles = [body["request_id"] for _, body in answers]
    assert len(set(handles)) == 12
    finals = []
    for i, handle in enumerate(handles):
        deadline = time.monotonic() + 20
        while (final := await _status(gateways[i % 3].url, handle))["status"] != "COMPLETED":
            assert time.monotonic() < deadline, final
            await asyncio.sleep(0.05)
        finals.append(final)
    assert len({json.dumps(final["output"], sort_keys=True) for final in finals}) == 1
    db = Peek(postgres_url)
    assert db.rows("SELECT kind, COUNT(*) FROM ledger GROUP BY kind ORDER BY kind") == [
        ("reserve", 1), ("saving", 11), ("settle", 1)]
    assert db.rows("SELECT spent_micros FROM budget_totals WHERE scope = 'team:design'") == [(PRICE,)]
    assert await ledger_mismatches(postgres_url) == []


async def test_200_polls_over_three_replicas_ask_the_upstream_once_per_interval(postgres_url: str,
                                                                               replicas: Replicas,
                                                                               simulator: Simulator) -> None:
    interval = 0.4
    gateways = await replicas(postgres_url, PROXY_POLL_INTERVAL=str(interval))
    simulator.queue_outcomes("STUCK")
    [(code, body)] = await _spread([gateways[0].url], 1, lambda i: {"prompt": "a stuck one"})
    assert code == 202
    handle = body["request_id"]
    before = len(simulator.calls_of("status"))
    started = time.monotonic()

    async with aiohttp.ClientSession() as http:
        async def poll(i: int) -> int:
            async with http.get(f"{gateways[i % 3].url}/v2/requests/status/{handle}", headers=auth()) as response:
                await response.read()
                return response.status
        codes = await asyncio.gather(*(poll(i) for i in range(200)))
        while time.monotonic() - started < 1.3:  # and again, spread over several intervals
            codes += await asyncio.gather(*(poll(i) for i in range(30)))
    elapsed = time.monotonic() - started
    calls = len(simulator.calls_of("status")) - before

    assert set(codes) == {200}
    assert 1 <= calls <= int(elapsed / interval) + 1


async def test_a_killed_replicas_jobs_and_webhooks_are_finished_by_the_others(postgres_url: str, replicas: Replicas,
                                                                             simulator: Simulator, tmp_path) -> None:
    policies = policies_with(tmp_path, webhooks="delivery: timeout_seconds = 1.0")
    simulator.settings.processing_seconds = 1.0
    hang = asyncio.Event()

    class Hanging(Receiver):
        async def handle(self, request):  # hangs until the replica holding the delivery is dead, then answers
            self.calls.append((dict(request.headers), await request.read(), time.monotonic()))
            if not hang.is_set():
                await asyncio.sleep(30)
            return aiohttp.web.Response(status=200)

    async with Hanging() as receiver:
        # The doomed replica runs alone until it holds every job's tracker lease and the hanging delivery's claim;
        # only then do the two survivors start, so what they finish is certainly the dead replica's work.
        [doomed] = await replicas(postgres_url, 1, None, policies, PROXY_WEBHOOK_ALLOW_PRIVATE="1")
        headers = auth() | {"X-Webhook-URL": receiver.url(), "X-Webhook-Mode": "sync"}
        answers = await _spread([doomed.url], 4, lambda i: {"prompt": f"doomed {i}"}, headers)
        assert [code for code, _ in answers] == [202] * 4
        await _until(lambda: len(receiver.calls) >= 1)  # a delivery is in flight, claimed by the doomed replica
        db = Peek(postgres_url)
        assert db.rows("SELECT COUNT(*) FROM outbox WHERE claimed_until > ''") >= [(1,)]
        await replicas(postgres_url, 2, {}, policies, PROXY_WEBHOOK_ALLOW_PRIVATE="1")

        doomed.kill()
        hang.set()

        await _until(lambda: db.rows("SELECT COUNT(*) FROM jobs WHERE status = 'COMPLETED'") == [(4,)], timeout=30)
        await _until(lambda: db.rows("SELECT COUNT(*) FROM outbox WHERE state <> 'delivered'") == [(0,)], timeout=30)

    assert _books_are_closed(db)
    assert await ledger_mismatches(postgres_url) == []
    delivered = {(body_of["request_id"], body_of["status"]) for body_of in receiver.delivered()}
    assert {status for _, status in delivered} >= {"COMPLETED"}
    assert {handle for handle, status in delivered if status == "COMPLETED"} == {b["request_id"] for _, b in answers}
    ids = [headers_of["webhook-id"] for headers_of, _, _ in receiver.calls]
    assert len(ids) >= len(set(ids))  # a retried delivery carries its webhook-id again
    assert db.rows("SELECT COUNT(*) FROM outbox") == [(len(set(ids)),)]


async def test_two_workers_on_one_sqlite_file_never_overspend(replicas: Replicas, tmp_path, simulator: Simulator) -> None:
    db = str(tmp_path / "workers.db")
    [gateway] = await replicas(db, 1, {"design": 5 * PRICE}, POLICIES, "--workers", "2")

    answers = await _spread([gateway.url], 30, lambda i: {"prompt": f"distinct {i}"})

    codes = [code for code, _ in answers]
    assert (codes.count(202), codes.count(402)) == (5, 25)
    assert len(simulator.calls_of("submit")) == 5
    assert await ledger_mismatches(db) == []
    # Every scrape, whichever worker answers it (a new connection each), counts both workers' requests, and the
    # store's figures once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(6):
            async with http.get(gateway.url + "/metrics") as response:
                text = await response.text()
            submitted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("pixazo_proxy_requests_total{") and f'route="{TEXT_PATH}"' in line)
            used = [line for line in text.splitlines() if line.startswith("pixazo_proxy_budget_used_usd{")]
            assert submitted == 30
            assert used == ['pixazo_proxy_budget_used_usd{team="design"} 2.1']


@pytest.mark.sqlite_only  # runs once: its database is a PostgreSQL cluster of its own, whatever the backend param
async def test_the_database_going_away_mid_load_answers_503_in_shape_and_work_resumes(start_gateway, simulator: Simulator,
                                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL stopped under load and started again: no 5xx with a trace, no overspend, and work resumes."""
    try:
        cluster = await asyncio.to_thread(ThrowawayCluster)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no PostgreSQL cluster of our own to stop and start: {error}")
    try:
        await asyncio.to_thread(Peek(cluster.url).execute, "CREATE DATABASE outage")
        url = with_database(cluster.url, "outage")
        gateway = await start_gateway(db_path=url, teams={"design": 20 * PRICE})
        answers: list[tuple[int, dict[str, Any]]] = []
        stop = asyncio.Event()

        async def load() -> None:
            i = 0
            while not stop.is_set():
                code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": f"under load {i}"})
                answers.append((code, body))
                i += 1
                await asyncio.sleep(0.02)

        loader = asyncio.create_task(load())
        await _until(lambda: len(answers) >= 3)
        await asyncio.to_thread(cluster.stop_server)
        down = len(answers)
        await _until(lambda: len(answers) >= down + 5)
        async with gateway.http.get(gateway.url + "/readyz") as response:
            ready_while_down = response.status
        await asyncio.to_thread(cluster.start_server)
        await asyncio.to_thread(wait_until_accepting, url)
        back = len(answers)
        await _until(lambda: any(code == 202 for code, _ in answers[back:]), timeout=30)
        stop.set()
        await loader
        async with gateway.http.get(gateway.url + "/readyz") as response:
            ready_after = response.status

        codes = {code for code, _ in answers}
        assert ready_while_down == 503 and ready_after == 200
        assert 503 in codes and codes <= {202, 402, 503}
        refused = [body for code, body in answers if code == 503]
        assert all(set(body) == {"error", "message"} and "Traceback" not in body["message"] for body in refused)
        db = Peek(url)
        (spent, reserved), = db.rows("SELECT spent_micros, reserved_micros FROM budget_totals WHERE scope = 'team:design'")
        assert spent + reserved <= 20 * PRICE
        assert await gateway.services.store.ledger_mismatches() == []
        assert not [r for r in caplog.records if r.levelname == "ERROR"], "an outage is not an error with a trace"
        await gateway.server.close()
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_one_idempotency_key_and_one_rate_limit_hold_across_replicas(postgres_url: str, replicas: Replicas,
                                                                           simulator: Simulator) -> None:
    gateways = await replicas(postgres_url)
    urls = [g.url for g in gateways]
    simulator.settings.processing_seconds = 0.5

    keyed = await _spread(urls, 9, lambda i: {"prompt": "keyed"}, auth() | {"Idempotency-Key": "order-1"})
    handles = {body["request_id"] for code, body in keyed if code == 202}
    assert {code for code, _ in keyed} <= {202, 409} and len(handles) == 1  # one handle, whoever answered
    assert len(simulator.calls_of("submit")) == 1
    await _until(lambda: Peek(postgres_url).rows("SELECT COUNT(*) FROM jobs WHERE status = 'COMPLETED'") == [(1,)])
    replayed = await _spread(urls, 3, lambda i: {"prompt": "keyed"}, auth() | {"Idempotency-Key": "order-1"})
    assert [(code, body["request_id"]) for code, body in replayed] == [(202, handles.pop())] * 3

    store = store_at(postgres_url)  # a team no replica has read yet, so none holds a copy of its row
    await store.open()
    try:
        await store.create_team("ads", 50_000_000, "month", max_submits_per_minute=4)
    finally:
        await store.close()
    limited = await _spread(urls, 12, lambda i: {"prompt": f"limited {i}"}, auth(team="ads", user="bob"))
    codes = [code for code, _ in limited]
    assert (codes.count(202), codes.count(429)) == (4, 8)


async def test_the_sweeper_lease_passes_to_a_survivor_when_its_holder_dies(postgres_url: str, replicas: Replicas,
                                                                          simulator: Simulator, tmp_path) -> None:
    """One replica sweeps at a time; when it is SIGKILLed, another takes the lease over once it expires and resolves
    what only a sweeper resolves (here: a submit whose answer was lost)."""
    interval = 0.3
    policies = policies_with(tmp_path, f"sweeper: interval_seconds = {interval}\nsweeper: orphan_submit_seconds = 0.5")
    db = Peek(postgres_url)
    [first] = await replicas(postgres_url, 1, None, policies, PROXY_UPSTREAM_TIMEOUT="0.3")
    await _until(lambda: len(db.rows("SELECT holder FROM leases WHERE name = 'sweeper'")) == 1)
    [(holder, until)] = db.rows("SELECT holder, until FROM leases WHERE name = 'sweeper'")
    [second] = await replicas(postgres_url, 1, {}, policies, PROXY_UPSTREAM_TIMEOUT="0.3")
    # Two renewals by the first holder after the second replica is up: the second has had its rounds and not taken it.
    await _until(lambda: db.rows("SELECT until FROM leases WHERE name = 'sweeper'")[0][0] > until + 2 * interval)
    assert db.rows("SELECT holder FROM leases WHERE name = 'sweeper'") == [(holder,)]

    first.kill()
    simulator.add_fault(Fault(op="submit", kind="delay", delay=1.0, stage="after"))  # created upstream, answer lost
    [(code, body)] = await _spread([second.url], 1, lambda i: {"prompt": "its answer lost"})
    assert code == 504 and "its cost stays reserved" in body["message"]

    await _until(lambda: [kind for (kind,) in db.rows("SELECT kind FROM ledger ORDER BY id")] == ["reserve", "settle"],
                 timeout=10)
    assert db.rows("SELECT spent_delta, reserved_delta, basis FROM ledger WHERE kind = 'settle'") == [
        (PRICE, -PRICE, "indeterminate")]
    [(taken_by,)] = db.rows("SELECT holder FROM leases WHERE name = 'sweeper'")
    assert taken_by != holder
    assert _books_are_closed(db)
    assert await ledger_mismatches(postgres_url) == []


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port`` (from /proc: its fds and the socket table)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return any(row[1].endswith(f":{port:04X}") and row[3] == "0A" and row[9] in inodes for row in rows)


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return {int(child) for child in listing.read().split()}


async def test_a_worker_that_dies_is_started_again_and_the_books_still_hold(replicas: Replicas, tmp_path,
                                                                           simulator: Simulator) -> None:
    db = str(tmp_path / "workers.db")
    [gateway] = await replicas(db, 1, {"design": 5 * PRICE}, POLICIES, "--workers", "2")
    assert gateway.process is not None
    await _until(lambda: len(_children(gateway.process.pid)) == 2)
    workers = _children(gateway.process.pid)
    victim = min(workers)

    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    await _until(lambda: len(_children(gateway.process.pid)) == 2 and victim not in _children(gateway.process.pid))
    assert "exited with -9; starting it again" in gateway.stderr()
    [fresh] = _children(gateway.process.pid) - workers
    await _until(lambda: _listens(fresh, gateway.port))  # the new worker has bound the shared port

    answers = await _spread([gateway.url], 30, lambda i: {"prompt": f"after the restart {i}"})

    codes = [code for code, _ in answers]
    assert (codes.count(202), codes.count(402)) == (5, 25)
    assert len(simulator.calls_of("submit")) == 5
    assert await ledger_mismatches(db) == []
