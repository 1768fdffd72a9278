"""The SQLite implementation of :class:`~proxy.store.Store`.

One WAL database, two kinds of connection, each on threads of its own so the
event loop never blocks on SQLite:

* one writer thread (:class:`~proxy.store.writer.GroupCommitWriter`) runs every
  write transaction start to finish as a single call; writes that queue up
  together share one ``COMMIT``, each in a savepoint of its own, so each is
  still all or nothing and a caller hears of success only once it is durable;
* reader threads, each with its own connection, answer reads; in WAL mode they
  see only committed state, so a read never observes half of a transaction;
* the hot point reads of a request (a handle, a team, a fingerprint, an
  idempotency key: one row through a unique or covering index) run on the event
  loop's own connection instead. A WAL reader never waits for the writer, and
  such a read takes microseconds, less than a thread hand-off; if SQLite ever
  answers busy (WAL recovery), the read goes to a reader thread instead.

(An earlier version went through aiosqlite, one thread hop per statement; a
submit's transaction made about fifteen of them while holding the write lock,
and that was what capped throughput. The next one ran each transaction as one
call but committed each alone: one fsync and two thread hand-offs per write.)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..ops.stopping import join_thread
from .checkpoint import WAL_SIZE_LIMIT, Checkpointer
from .migrations import MIGRATIONS
from .sql import Tx, run_sync
from .sqlstore import SqlStore
from .writer import GroupCommitWriter

logger = logging.getLogger(__name__)
T = TypeVar("T")
Db = sqlite3.Connection

class SQLiteStore(SqlStore):
    """SQLite-backed store. ``path`` may be ``:memory:`` (one connection for everything) for tools and tests."""

    def __init__(self, path: str | Path, *, readers: int = 2, checkpoint_seconds: float = 1.0) -> None:
        super().__init__()
        self.path = str(path)
        self.readers = readers
        self.checkpoint_seconds = checkpoint_seconds
        self._writer: GroupCommitWriter | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._loop_reader: Db | None = None
        self._checkpointer: Checkpointer | None = None
        self._local = threading.local()
        self._reader_connections: list[Db] = []
        self._lock = threading.Lock()

    # connections and threads

    def _connect(self) -> Db:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA busy_timeout = 5000")
        connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        return connection

    def _connect_writer(self) -> Db:
        connection = self._connect()
        if self.path != ":memory:":
            connection.execute("PRAGMA wal_autocheckpoint = 0")  # the Checkpointer's thread does it, off this path
        return connection

    async def open(self) -> None:
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        writer = GroupCommitWriter(self._connect_writer)
        await writer.start()
        self._writer = writer
        await self._writer.submit(self._migrate)
        if not memory:
            self._reader_pool = ThreadPoolExecutor(self.readers, thread_name_prefix="store-reader")
            self._loop_reader = self._connect()
            self._loop_reader.execute("PRAGMA busy_timeout = 0")  # never block the loop: busy goes to a thread
            self._loop_reader.execute("PRAGMA query_only = ON")
            self._checkpointer = Checkpointer(self._connect, self.checkpoint_seconds)
            self._checkpointer.start()

    async def close(self, within: float = 5.0) -> None:
        """Finish the writes queued, then close, within ``within`` seconds.

        Reads still running (a report over a big ledger) are interrupted: they change nothing. A thread that
        has not ended by the deadline is named in the log and left to end with the process (each is a daemon).
        """
        writer, reader_pool = self._writer, self._reader_pool
        self._writer = self._reader_pool = None
        if writer is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        if self._loop_reader is not None:
            self._loop_reader.close()
            self._loop_reader = None
        with self._lock:
            for connection in self._reader_connections:
                connection.interrupt()  # thread-safe: a read under way ends with "interrupted"
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop_soon()
        stopped = await writer.stop(within)
        if reader_pool is not None:
            reader_pool.shutdown(wait=False, cancel_futures=True)
            stopped = await join_thread(reader_pool.shutdown, deadline - loop.time()) and stopped
        if checkpointer is not None:
            stopped = await join_thread(checkpointer.stop, deadline - loop.time()) and stopped
        if not stopped:
            logger.error("the SQLite store's threads did not all end within %.1f s of closing", within,
                         extra={"event": "shutdown.stuck", "task": "store threads"})
            return
        with self._lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections.clear()
        self._local = threading.local()

    async def _write(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        """Run ``body(*args)`` atomically on the writer thread: committed, or rolled back if it raises."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.submit(lambda db: run_sync(db, body(*args)))

    def _reader(self) -> Db:
        """This reader thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._reader_connections.append(connection)
        return connection

    async def _read(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        """Run ``body(*args)`` on a reader thread (on the writer's, for ``:memory:``: one connection)."""
        if self._reader_pool is None:
            if self._writer is None:
                raise RuntimeError("store is not open")
            return await self._writer.submit(lambda db: run_sync(db, body(*args)), transaction=False)
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool,
                                                                lambda: run_sync(self._reader(), body(*args)))

    async def _point(self, sql: str, *params: Any) -> Any:
        """One row by key, on the event loop's own connection (see the module docstring)."""
        db = self._loop_reader
        if db is None:
            return await super()._point(sql, *params)
        try:
            cursor = db.execute(sql, params)
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # ends the read transaction now
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            return await super()._point(sql, *params)

    def _migrate(self, db: Db) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database {self.path} has schema version {version}, newer than this gateway's {len(MIGRATIONS)}"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            for statement in _statements(MIGRATIONS[number - 1]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
            logger.info("store migrated to schema version %d", number)

    async def ping(self) -> bool:
        """True while reads are answered and the writer can write (a failed writer makes ``/readyz`` 503)."""
        if self._writer is None or not self._writer.healthy:
            return False
        try:
            return tuple(await super()._point("SELECT 1")) == (1,)
        except (sqlite3.Error, RuntimeError):
            return False


def _statements(script: str) -> list[str]:
    """Split a migration script into whole statements (a trigger's body holds ';' of its own)."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"a migration ends inside a statement: {pending.strip()[:80]}")
    return statements
