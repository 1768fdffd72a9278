"""The PostgreSQL implementation of :class:`~proxy.store.Store`, for several gateway processes and replicas.

It runs the same transaction bodies as SQLite (:class:`~proxy.store.sqlstore.SqlStore`) on pooled asyncpg
connections (``PROXY_DB_POOL_SIZE`` per process). Each write body is one transaction at READ COMMITTED; what
keeps replicas from overspending is the same as on SQLite, one conditional ``UPDATE`` per budget scope, because
PostgreSQL re-checks an ``UPDATE``'s condition on the row version it waited for. A body that loses a
serialization or deadlock race is run again from the start (it has done nothing that survives).

Migrations run at start-up inside one transaction holding a transaction-scoped advisory lock, so replicas
starting together migrate once; a database migrated by a newer gateway is refused.

When the database cannot be reached, every call raises :class:`~proxy.errors.StoreUnavailable` (503 with
``Retry-After``), never a bare driver error; ``ping`` (``/readyz``) answers False.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from ..domain.errors import StoreUnavailable
from .postgres_migrations import POSTGRES_MIGRATIONS
from .sql import Fetched, Rows, Sql, Tx, numbered
from .sqlstore import SqlStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The advisory lock key migrations hold ("pixazo" in ASCII): replicas starting together migrate once.
MIGRATION_LOCK = 0x706978617A6F
#: How often a body that lost a serialization or deadlock race is run again before giving up.
RACE_RETRIES = 5
#: Seconds a caller waits for a pooled connection, and to open one, before the store counts as unreachable.
CONNECT_TIMEOUT_SECONDS = 5.0
#: What is worth trying again at once: the transaction lost a race with another and did nothing.
_RACES = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
#: What means the database is not there (down, restarting, unreachable, out of connections).
_UNREACHABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                asyncpg.TooManyConnectionsError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                asyncpg.InternalClientError,  # a pooled connection cut mid-operation (the server went away)
                TimeoutError)


class PostgresStore(SqlStore):
    """PostgreSQL-backed store at ``url`` (``postgresql://user@host:port/db``)."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        super().__init__()
        self.url = url
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                   timeout=CONNECT_TIMEOUT_SECONDS, statement_cache_size=512)
        except _UNREACHABLE as error:
            raise StoreUnavailable(f"the database cannot be reached: {type(error).__name__}") from error
        except asyncpg.PostgresError as error:  # no such database, role or password: a message that says which
            raise StoreUnavailable(f"the database refused the connection: {error}") from error
        await self._migrate()

    async def close(self, within: float = 5.0) -> None:
        """Close the pool, waiting up to ``within`` for connections in use to come back; then cut them.

        A connection cut mid-transaction is rolled back by the server: nothing of it is kept.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(within):
                await pool.close()
        except TimeoutError:
            logger.warning("database connections still in use %.1f s into closing were cut", within,
                           extra={"event": "store.close_cut"})
            pool.terminate()

    async def _migrate(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            if version > len(POSTGRES_MIGRATIONS):
                raise RuntimeError(f"the database has schema version {version}, newer than this gateway's "
                                   f"{len(POSTGRES_MIGRATIONS)}")
            for number in range(version + 1, len(POSTGRES_MIGRATIONS) + 1):
                await conn.execute(POSTGRES_MIGRATIONS[number - 1])
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
                logger.info("store migrated to schema version %d (PostgreSQL)", number)

    async def ping(self) -> bool:
        """True while the database answers (``/readyz``)."""
        if self._pool is None:
            return False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                return bool(await self._pool.fetchval("SELECT 1") == 1)
        except (*_UNREACHABLE, asyncpg.PostgresError):
            return False

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def _write(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        pool = self._pool_or_fail()
        for attempt in range(RACE_RETRIES):
            try:
                async with pool.acquire(timeout=CONNECT_TIMEOUT_SECONDS) as conn, conn.transaction():
                    return await run_async(conn, body(*args))
            except _RACES:
                if attempt == RACE_RETRIES - 1:
                    raise
                logger.info("a write lost a race with another and runs again")
            except _UNREACHABLE as error:
                raise StoreUnavailable(f"the database cannot be reached: {type(error).__name__}") from error
        raise AssertionError("unreachable")

    async def _read(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        pool = self._pool_or_fail()
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_SECONDS) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                return await run_async(conn, body(*args))  # one snapshot for every statement of the body
        except _UNREACHABLE as error:
            raise StoreUnavailable(f"the database cannot be reached: {type(error).__name__}") from error

    async def _point(self, sql: str, *params: Any) -> Any:
        pool = self._pool_or_fail()
        try:
            row = await pool.fetchrow(_numbered(sql), *params, timeout=CONNECT_TIMEOUT_SECONDS)
        except _UNREACHABLE as error:
            raise StoreUnavailable(f"the database cannot be reached: {type(error).__name__}") from error
        return _row(row) if row is not None else None


_NUMBERED: dict[str, str] = {}


def _numbered(text: str) -> str:
    found = _NUMBERED.get(text)
    if found is None:
        found = _NUMBERED[text] = numbered(text)
        if len(_NUMBERED) > 4096:  # statements built per call (IN lists of varying length) must not pile up
            _NUMBERED.clear()
    return found


def _returns_rows(text: str) -> bool:
    """Whether a statement answers rows (fetched) rather than a count of rows changed (executed)."""
    return text.lstrip()[:6].upper().startswith(("SELECT", "WITH", "VALUES")) or " RETURNING " in text.upper()


def _value(value: Any) -> Any:
    """SUM over BIGINT is NUMERIC in PostgreSQL; every sum the store takes is of whole micro-dollars or counts."""
    if isinstance(value, Decimal):
        whole = int(value)
        if whole != value:
            raise ValueError(f"a sum the store expected whole came back as {value}")
        return whole
    return value


def _row(record: Any) -> tuple[Any, ...]:
    return tuple(_value(value) for value in record)


async def run_async(conn: asyncpg.Connection, tx: Tx[T]) -> T:
    """Run a transaction body on an asyncpg connection (the caller owns the transaction around it)."""
    try:
        statement: Sql = next(tx)
        while True:
            rows: Rows
            source = statement.postgres or statement.text
            text = _numbered(source)
            if _returns_rows(source):
                records = await conn.fetch(text, *statement.params)
                rows = Fetched([_row(record) for record in records], len(records))
            else:
                status = await conn.execute(text, *statement.params)
                count = status.rsplit(" ", 1)[-1]
                rows = Fetched([], int(count) if count.isdigit() else 0)
            statement = tx.send(rows)
    except StopIteration as done:
        return done.value
