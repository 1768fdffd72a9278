"""Shared fixtures: a real simulator and a real gateway, each an HTTP server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config import Config, load_config
from proxy.domain.catalog import Catalog, load_catalog
from proxy.domain.clock import Clock
from proxy.http.server import GatewayRunner, runner_shutdown_timeout
from proxy.services import SERVICES, Services
from proxy.simulator.server import Simulator, SimulatorSettings
from proxy.store.factory import store_at
from tests.databases import Peek, PostgresServer, start_postgres

pytest_plugins = ["tests.hang_guard", "tests.skip_guard"]

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
JWT_SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop"
UPSTREAM_KEY = "sk-sim-Zq7XW9876-tRv2Lm4-Np8KdYh3"  # random-looking, as a real key is: no English word in it
TEXT_PATH = "/grok-imagine-video-text-to-video/v1/grok-imagine-video-text-to-video-request"
IMAGE_PATH = "/grok-imagine-video-image-to-video/v1/grok-imagine-video-image-to-video-request"
EDIT_PATH = "/grok-imagine-video-edit-video/v1/grok-imagine-video-edit-video-request"
REFERENCE_PATH = "/grok-imagine-video-reference-to-video/v1/grok-imagine-video-reference-to-video-request"


class ManualClock(Clock):
    """A clock the test moves by hand (budget periods read it)."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment


def policies_with(tmp_path: Path, budgets: str = "", cache: str = "", webhooks: str = "", upstream: str = "") -> Path:
    """A copy of policies/ with settings changed: lines of ``section: key = value`` per file."""
    directory = tmp_path / f"policies-{len(list(tmp_path.glob('policies-*')))}"
    shutil.copytree(POLICIES, directory)
    for name, changes in (("budgets.toml", budgets), ("cache.toml", cache), ("webhooks.toml", webhooks),
                          ("upstream.toml", upstream)):
        text = (directory / name).read_text()
        for line in changes.strip().splitlines():
            section, assignment = (part.strip() for part in line.split(":", 1))
            key = assignment.split("=", 1)[0].strip()
            head, found, rest = text.partition(f"[{section}]\n")
            assert found, f"no [{section}] in {name}"
            body, bracket, tail = rest.partition("\n[")
            body = "\n".join(kept for kept in body.split("\n") if not kept.startswith(f"{key} ="))
            text = f"{head}[{section}]\n{assignment}\n{body}{bracket}{tail}"
        (directory / name).write_text(text)
    return directory


BACKENDS = ("sqlite", "postgresql")


class LoopbackServer(TestServer):
    """A test server whose stop has a bound, so a fixture's teardown can never wait for ever.

    Its requests in flight get ``request_seconds`` (aiohttp's default is 60 s), and the whole close
    ``close_seconds``; a close that takes longer fails the test, naming the server.
    """

    request_seconds = 1.0
    close_seconds = 10.0

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs.setdefault("shutdown_timeout", runner_shutdown_timeout(self.request_seconds))
        return await super()._make_runner(**kwargs)

    async def close(self) -> None:
        port = self.port
        try:
            async with asyncio.timeout(self.close_seconds):
                await super().close()
        except TimeoutError:
            raise AssertionError(f"the test server on port {port} did not stop within {self.close_seconds:g} s") from None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[tuple[PostgresServer | None, str]]:
    """The run's PostgreSQL (see tests/databases.py), or None and the reason its tests are skipped."""
    server, reason = start_postgres()
    yield server, reason
    if server is not None:
        server.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which store backend the test's gateway runs on: every behavioural test runs on both."""
    return str(request.param)


@pytest.fixture
def db_location(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Where the test's gateway keeps its books: a SQLite file, or a PostgreSQL database of its own."""
    if backend == "sqlite":
        yield str(tmp_path / "gateway.db")
        return
    server, reason = request.getfixturevalue("postgres_server")
    if server is None:
        pytest.skip(f"PostgreSQL: {reason} (the top of the run says how to run these)")
    url = server.create()
    yield url
    server.drop(url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``sqlite_only`` (the SQLite writer, its files and pragmas) do not run on PostgreSQL."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("backend") == "postgresql"
        (dropped if on_postgres and item.get_closest_marker("sqlite_only") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: about the SQLite backend itself; not run on PostgreSQL")


async def create_teams(db: str | Path, teams: dict[str, int]) -> None:
    """Teams (name -> monthly budget in micro-dollars) in a database, before a gateway opens it."""
    store = store_at(db)
    await store.open()
    try:
        for name, limit in teams.items():
            await store.create_team(name, limit, "month")
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def loopback_server(*routes: tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]
                          ) -> AsyncIterator[TestServer]:
    """A plain aiohttp server on a free loopback port with ``routes`` (method, path, handler)."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    server = LoopbackServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def ledger_mismatches(db: str | Path) -> list[str]:
    """The store's own check that every running total equals its ledger, on a database."""
    store = store_at(db)
    await store.open()
    try:
        return await store.ledger_mismatches()
    finally:
        await store.close()


_responses_seen: list[str] = []


class RecordingResponse(aiohttp.ClientResponse):
    """A client response that remembers what it carried, for the suite-wide leak scan."""

    async def read(self) -> bytes:
        body = await super().read()
        _responses_seen.append(f"{self.status} {dict(self.headers)} {body.decode(errors='replace')}")
        return body


@pytest.fixture(autouse=True)
def no_secret_leaks(caplog: pytest.LogCaptureFixture):
    """Every test: nothing the gateway logged, and no response a gateway client read, holds a secret."""
    caplog.set_level(logging.DEBUG)
    _responses_seen.clear()
    yield
    records = [record for phase in ("setup", "call") for record in caplog.get_records(phase)]
    captured = "\n".join(_responses_seen) + "\n".join(
        f"{record.getMessage()} {record.exc_text or ''} {record.__dict__}" for record in records)
    for secret in (UPSTREAM_KEY, JWT_SECRET):
        assert secret not in captured, "a secret leaked into a response or a log line"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_token(team: str = "design", user: str = "alice", *, secret: str = JWT_SECRET, algorithm: str = "HS256",
               ttl: int = 600, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "team": team, "iat": now, "exp": now + ttl}
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


def auth(token: str | None = None, **kwargs: Any) -> dict[str, str]:
    """The headers an existing Pixazo client sends, with a gateway token where the key was."""
    return {
        "Content-Type": "application/json",
        "Cache-Control": "no-cache",
        "Ocp-Apim-Subscription-Key": token or make_token(**kwargs),
    }


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(POLICIES)


@pytest.fixture
async def simulator(catalog: Catalog) -> AsyncIterator[Simulator]:
    """The Pixazo simulator with fast timing, served on loopback; ``simulator.url`` is its base."""
    sim = Simulator(
        catalog,
        SimulatorSettings(key=UPSTREAM_KEY, queued_seconds=0.05, processing_seconds=0.15, allow_http_webhooks=True),
    )
    server = LoopbackServer(sim.build_app(), host="127.0.0.1", port=free_port())
    await server.start_server()
    sim.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield sim
    await server.close()


class Receiver:
    """A webhook endpoint on loopback: records every POST; fails the first ``fail`` with ``status``."""

    def __init__(self, fail: int = 0, status: int = 500, headers: dict[str, str] | None = None) -> None:
        self.fail, self.status, self.headers = fail, status, headers or {}
        self.calls: list[tuple[dict[str, str], bytes, float]] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read(), time.monotonic()))
        if self.fail:
            self.fail -= 1
            return web.Response(status=self.status, headers=self.headers)
        return web.Response(status=200)

    async def redirect(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read(), time.monotonic()))
        raise web.HTTPFound(str(self.url("/hook")))

    def url(self, path: str = "/hook") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def delivered(self) -> list[dict[str, Any]]:
        return [json.loads(body) for headers, body, _ in self.calls]

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/moved", self.redirect)
        self.server = LoopbackServer(app, host="127.0.0.1", port=free_port())
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.close()


class GatewayTestServer(LoopbackServer):
    """A test server that runs the gateway as ``serve`` does: its runner answers parser errors in shape, and
    it stops as ``serve`` stops, within the config's shutdown bound."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.request_seconds = config.shutdown_request_seconds
        self.close_seconds = config.shutdown_seconds + 2.0

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, shutdown_timeout=runner_shutdown_timeout(self.request_seconds), **kwargs)


_takes = itertools.count(1)  # default bodies differ, so separate submits are separate jobs, not cache hits


class Gateway:
    """A running gateway: its URL, its services, and an HTTP client session."""

    def __init__(self, server: TestServer, session: aiohttp.ClientSession, config: Config) -> None:
        self.server = server
        self.http = session
        self.url = str(server.make_url("")).rstrip("/")
        self.db_path = config.db_path  # a SQLite path or a PostgreSQL URL
        self.db = Peek(config.db_path)
        self.upstream_url = config.upstream_url

    @property
    def services(self) -> Services:
        return self.server.app[SERVICES]

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``query`` (``?`` placeholders), read straight from the gateway's database, whichever it is."""
        return self.db.rows(query, *params)

    def execute(self, statement: str, *params: Any) -> int:
        """Change the gateway's database behind its back (a test's tampering); rows changed."""
        return self.db.execute(statement, *params)

    def ledger_rows(self, *columns: str) -> list[tuple[Any, ...]]:
        """The ledger, oldest first, read straight from the database."""
        return self.sql(f"SELECT {', '.join(columns)} FROM ledger ORDER BY id")

    def totals(self, scope: str = "team:design") -> list[tuple[str, int, int, int]]:
        """(period, spent, reserved, credit) of one scope, from the database."""
        return self.sql("SELECT period_key, spent_micros, reserved_micros, credit_micros FROM budget_totals "  # type: ignore[return-value]
                        "WHERE scope = ? ORDER BY period_key", scope)

    async def submit(self, path: str = TEXT_PATH, body: Any = None, headers: dict[str, str] | None = None,
                     **kwargs: Any) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        body = {"prompt": f"a lighthouse at dusk, take {next(_takes)}"} if body is None else body
        async with self.http.post(self.url + path, json=body, headers=auth() if headers is None else headers, **kwargs) as response:
            return response.status, await response.json(), response.headers

    async def status(self, handle: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.get(f"{self.url}/v2/requests/status/{handle}", headers=auth() if headers is None else headers) as response:
            return response.status, await response.json()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(db_location: str, simulator: Simulator) -> AsyncIterator[GatewayFactory]:
    """Start a gateway in front of the simulator; keyword arguments override config fields.

    ``teams`` (name -> budget micro-dollars) are created before it starts.
    """
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def start(teams: dict[str, int | dict[str, Any]] | None = None, clock: Clock | None = None,
                    **overrides: Any) -> Gateway:
        port = overrides.pop("port", None) or free_port()
        db_path = overrides.pop("db_path", db_location)
        store = store_at(db_path)
        await store.open()
        for name, spec in (teams if teams is not None else {"design": 50_000_000, "research": 50_000_000}).items():
            settings = {"budget_limit_micros": spec} if isinstance(spec, int) else dict(spec)
            if await store.get_team(name) is None:
                limit = settings.pop("budget_limit_micros")
                await store.create_team(name, limit, settings.pop("period", "month"), **settings)
        await store.close()
        values: dict[str, Any] = {
            "upstream_url": simulator.url,  # type: ignore[attr-defined]
            "upstream_key": UPSTREAM_KEY,
            "jwt_secret": JWT_SECRET,
            "db_path": db_path,
            "policies_dir": POLICIES,
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "status_refresh_seconds": 0.01,
            "upstream_timeout": 5.0,
            "probe_allow_private": True,
        }
        values.update(overrides)
        config: Config = load_config({}, **values)
        server = GatewayTestServer(build_app(config, clock=clock), config, host="127.0.0.1", port=port)
        await server.start_server()
        session = aiohttp.ClientSession(response_class=RecordingResponse)
        started.append((server, session))
        return Gateway(server, session, config)

    yield start
    for server, session in started:
        await session.close()
        await server.close()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway()


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true, or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def wait_for_status(gateway: Gateway, handle: str, wanted: set[str], headers: dict[str, str] | None = None,
                          timeout: float = 5.0) -> dict[str, Any]:
    """Poll ``handle`` until its status is one of ``wanted``; fail the test if it is not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = await gateway.status(handle, headers)
        assert code == 200, body
        if body["status"] in wanted:
            return body
        assert time.monotonic() < deadline, f"{handle} stayed {body['status']}, never {sorted(wanted)}"
        await asyncio.sleep(0.02)

