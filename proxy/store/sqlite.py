"""The SQLite implementation of :class:`~proxy.store.Store`, through aiosqlite.

Two connections to one WAL database: a writer, whose transactions are
serialized by a lock, and a reader, which sees only committed state. A read
therefore never observes half of someone else's transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ..clock import iso_utc
from . import PERIODS, TERMINAL_STATUSES, HandleView, JobUpdate, Team, TeamExists
from .migrations import MIGRATIONS

logger = logging.getLogger(__name__)

_HANDLE_QUERY = """
    SELECT h.id, h.team, h.user_id, h.model, h.created_at,
           j.id, j.upstream_id, j.status, j.output, j.error, j.updated_at, j.completed_at, j.checked_at
    FROM handles h JOIN jobs j ON j.id = h.job_id
    WHERE h.id = ? AND j.status NOT IN ('SUBMITTING', 'REJECTED')
"""
_TERMINAL = "(" + ", ".join(f"'{status}'" for status in TERMINAL_STATUSES) + ")"


class SQLiteStore:
    """SQLite-backed store. ``path`` may be ``:memory:`` only for single-connection tools."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._migrate()
        self._reader = self._writer if self.path == ":memory:" else await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        connection = await aiosqlite.connect(self.path, isolation_level=None)
        await connection.execute("PRAGMA journal_mode = WAL")
        await connection.execute("PRAGMA synchronous = FULL")
        await connection.execute("PRAGMA foreign_keys = ON")
        await connection.execute("PRAGMA busy_timeout = 5000")
        return connection

    async def close(self) -> None:
        for connection in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            await connection.close()
        self._reader = self._writer = None

    async def _migrate(self) -> None:
        async with self.transaction() as db:
            version = (await (await db.execute("PRAGMA user_version")).fetchone())[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"database {self.path} has schema version {version}, newer than this gateway's {len(MIGRATIONS)}"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                for statement in _statements(MIGRATIONS[number - 1]):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
                logger.info("store migrated to schema version %d", number)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; commits on success, rolls back on any exception."""
        assert self._writer is not None, "store is not open"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")

    async def _read_one(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | tuple[Any, ...] | None:
        assert self._reader is not None, "store is not open"
        async with self._reader.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def ping(self) -> bool:
        try:
            return await self._read_one("SELECT 1", ()) == (1,)
        except (sqlite3.Error, AssertionError, ValueError):
            return False

    # teams

    async def create_team(self, name: str, budget_limit_micros: int, period: str) -> Team:
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}")
        team = Team(name, budget_limit_micros, period, iso_utc())
        try:
            async with self.transaction() as db:
                await db.execute(
                    "INSERT INTO teams (name, budget_limit_micros, period, created_at) VALUES (?, ?, ?, ?)",
                    (team.name, team.budget_limit_micros, team.period, team.created_at),
                )
        except sqlite3.IntegrityError:
            raise TeamExists(name) from None
        return team

    async def get_team(self, name: str) -> Team | None:
        row = await self._read_one(
            "SELECT name, budget_limit_micros, period, created_at FROM teams WHERE name = ?", (name,)
        )
        return Team(*row) if row else None

    async def list_teams(self) -> list[Team]:
        assert self._reader is not None, "store is not open"
        async with self._reader.execute(
            "SELECT name, budget_limit_micros, period, created_at FROM teams ORDER BY name"
        ) as cursor:
            return [Team(*row) async for row in cursor]

    # handles and jobs

    async def begin_submission(self, handle: str, team: str, user: str, model: str, params_json: str) -> int:
        now = iso_utc()
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO jobs (model, params, status, created_at, updated_at) VALUES (?, ?, 'SUBMITTING', ?, ?)",
                (model, params_json, now, now),
            )
            job_id = cursor.lastrowid
            await db.execute(
                "INSERT INTO handles (id, job_id, team, user_id, model, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (handle, job_id, team, user, model, now),
            )
        assert job_id is not None
        return job_id

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE jobs SET upstream_id = ?, status = ?, updated_at = ? WHERE id = ? AND status = 'SUBMITTING'",
                (upstream_id, status, iso_utc(), job_id),
            )

    async def mark_rejected(self, job_id: int, reason: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE jobs SET status = 'REJECTED', error = ?, updated_at = ? WHERE id = ? AND status = 'SUBMITTING'",
                (reason, iso_utc(), job_id),
            )

    async def get_handle(self, handle: str) -> HandleView | None:
        row = await self._read_one(_HANDLE_QUERY, (handle,))
        if row is None:
            return None
        (handle_id, team, user, model, created_at, job_id, upstream_id, status, output, error, updated_at,
         completed_at, checked_at) = row
        return HandleView(
            handle=handle_id,
            team=team,
            user=user,
            model=model,
            created_at=created_at,
            job_id=job_id,
            upstream_id=upstream_id,
            status=status,
            output=json.loads(output) if output else None,
            error=error,
            updated_at=updated_at,
            completed_at=completed_at,
            checked_at=checked_at,
        )

    async def update_job(self, job_id: int, update: JobUpdate) -> bool:
        async with self.transaction() as db:
            cursor = await db.execute(
                f"""UPDATE jobs SET status = ?, output = ?, error = ?, updated_at = ?, completed_at = ?,
                    checked_at = ? WHERE id = ? AND status NOT IN {_TERMINAL}""",
                (
                    update.status,
                    json.dumps(update.output, separators=(",", ":")) if update.output is not None else None,
                    update.error,
                    update.updated_at,
                    update.completed_at,
                    update.checked_at,
                    job_id,
                ),
            )
            return cursor.rowcount == 1


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (migrations hold no ';' inside literals)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
