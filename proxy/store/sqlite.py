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
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..clock import iso_utc
from ..ttlcache import TtlCache
from ..values import Hold
from ..views import status_body
from . import (
    TERMINAL_STATUSES,
    BudgetView,
    Decision,
    Delivery,
    HandleView,
    HoldCheck,
    JobUpdate,
    LedgerEntry,
    Receipt,
    RememberedKey,
    Reservation,
    ReusableJob,
    RunningJob,
    Saving,
    SpendRow,
    Submission,
    Team,
    TeamExists,
    UnknownTeam,
    accounts,
    check_team_settings,
    outbox,
    team_name_problem,
)
from .checkpoint import WAL_SIZE_LIMIT, Checkpointer
from .migrations import MIGRATIONS
from .writer import GroupCommitWriter

logger = logging.getLogger(__name__)
T = TypeVar("T")
Db = sqlite3.Connection

_HANDLE_SELECT = """
    SELECT h.id, h.team, h.user_id, h.model, h.created_at,
           j.id, j.upstream_id, j.status, j.output, j.error, j.updated_at, j.completed_at, j.checked_at
    FROM handles h JOIN jobs j ON j.id = h.job_id
    WHERE j.status NOT IN ('SUBMITTING', 'INDETERMINATE', 'REJECTED')
"""
_TEAM_COLUMNS = ("name, budget_limit_micros, period, created_at, soft_threshold_percent, user_cap_micros, "
                 "max_concurrent_jobs, max_submits_per_minute, updated_at")
_TEAM_BY_NAME = f"SELECT {_TEAM_COLUMNS} FROM teams WHERE name = ?"
_RESERVATION_SELECT = """
    SELECT r.job_id, r.handle, r.team, r.user_id, r.model, r.period_key, r.amount_micros, r.seconds, r.resolution,
           r.basis, r.state, r.created_at, j.params, j.status, j.upstream_id
    FROM reservations r JOIN jobs j ON j.id = r.job_id
"""
#: The handles of one job that asked for webhooks: (url, mode, then the _HANDLE_SELECT columns).
_WEBHOOK_HANDLES = (_HANDLE_SELECT.replace("SELECT h.id,", "SELECT h.webhook_url, h.webhook_mode, h.id,")
                    + " AND h.job_id = ? AND h.webhook_url IS NOT NULL")
#: Expired idempotency keys deleted per write transaction.
PURGE_BATCH = 1000
#: How long a team row read for a request is reused; changes made by another process (the CLI) show within this.
TEAM_ROW_SECONDS = 1.0
_TERMINAL = "(" + ", ".join(f"'{status}'" for status in TERMINAL_STATUSES) + ")"


class SQLiteStore:
    """SQLite-backed store. ``path`` may be ``:memory:`` (one connection for everything) for tools and tests."""

    def __init__(self, path: str | Path, *, readers: int = 2, checkpoint_seconds: float = 1.0) -> None:
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
        self._teams: TtlCache[str, Team] = TtlCache(TEAM_ROW_SECONDS, 10_000)

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
        await self._write(self._migrate)
        if not memory:
            self._reader_pool = ThreadPoolExecutor(self.readers, thread_name_prefix="store-reader")
            self._loop_reader = self._connect()
            self._loop_reader.execute("PRAGMA busy_timeout = 0")  # never block the loop: busy goes to a thread
            self._loop_reader.execute("PRAGMA query_only = ON")
            self._checkpointer = Checkpointer(self._connect, self.checkpoint_seconds)
            self._checkpointer.start()

    async def close(self) -> None:
        writer, reader_pool = self._writer, self._reader_pool
        self._writer = self._reader_pool = None
        if writer is None:
            return
        if self._loop_reader is not None:
            self._loop_reader.close()
            self._loop_reader = None
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        await writer.stop()
        if reader_pool is not None:
            reader_pool.shutdown(wait=True)
        with self._lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections.clear()
        self._local = threading.local()

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` atomically on the writer thread: committed, or rolled back if it raises."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.submit(functools.partial(fn, *args) if args else fn)

    def _reader(self) -> Db:
        """This reader thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._reader_connections.append(connection)
        return connection

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on a reader thread (on the writer's, for ``:memory:``: one connection)."""
        if self._reader_pool is None:
            if self._writer is None:
                raise RuntimeError("store is not open")
            return await self._writer.submit(lambda db: fn(db, *args), transaction=False)
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, lambda: fn(self._reader(), *args))

    async def _read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await self._read(lambda db: db.execute(sql, params).fetchone())

    async def _read_point(self, sql: str, params: tuple[Any, ...]) -> Any:
        """One row by key, on the event loop's own connection (see the module docstring)."""
        db = self._loop_reader
        if db is None:
            return await self._read_one(sql, params)
        try:
            cursor = db.execute(sql, params)
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # ends the read transaction now
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            return await self._read_one(sql, params)

    async def _read_all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return await self._read(lambda db: db.execute(sql, params).fetchall())

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
            return await self._read_one("SELECT 1", ()) == (1,)
        except (sqlite3.Error, RuntimeError):
            return False

    # teams

    async def create_team(self, name: str, budget_limit_micros: int, period: str, **settings: Any) -> Team:
        if (problem := team_name_problem(name)) is not None:
            raise ValueError(problem)
        check_team_settings({"budget_limit_micros": budget_limit_micros, "period": period, **settings})
        now = iso_utc()
        values = {"budget_limit_micros": budget_limit_micros, "period": period, **settings}
        names = ", ".join(values)

        def insert(db: Db) -> None:
            db.execute(
                f"INSERT INTO teams (name, {names}, created_at, updated_at) "
                f"VALUES (?, {', '.join('?' for _ in values)}, ?, ?)",
                (name, *values.values(), now, now),
            )

        try:
            await self._write(insert)
        except sqlite3.IntegrityError:
            raise TeamExists(name) from None
        team = await self.get_team(name)
        assert team is not None
        return team

    async def update_team(self, name: str, **settings: Any) -> Team:
        check_team_settings(settings)
        if settings:
            assignments = ", ".join(f"{column} = ?" for column in settings)

            def update(db: Db) -> None:
                cursor = db.execute(f"UPDATE teams SET {assignments}, updated_at = ? WHERE name = ?",
                                    (*settings.values(), iso_utc(), name))
                if cursor.rowcount != 1:
                    raise UnknownTeam(name)

            await self._write(update)
            self._teams.forget(name)
        team = await self.get_team(name)
        if team is None:
            raise UnknownTeam(name)
        return team

    async def get_team(self, name: str) -> Team | None:
        """The team's row, read at most :data:`TEAM_ROW_SECONDS` ago; this store's own updates show at once.

        Nothing that moves money relies on this copy: reservations read the team inside their transaction.
        """
        team = self._teams.get(name)
        if team is None:
            row = await self._read_point(_TEAM_BY_NAME, (name,))
            if row is None:
                return None
            team = Team(*row)
            self._teams.put(name, team)
        return team

    async def list_teams(self) -> list[Team]:
        return [Team(*row) for row in await self._read_all(f"SELECT {_TEAM_COLUMNS} FROM teams ORDER BY name", ())]

    @staticmethod
    def _team_in(db: Db, name: str) -> Team:
        row = db.execute(_TEAM_BY_NAME, (name,)).fetchone()
        if row is None:
            raise UnknownTeam(name)
        return Team(*row)

    # handles and jobs

    async def begin_submission(self, submission: Submission, hold: Hold | None) -> Receipt:
        now = iso_utc()

        def begin(db: Db) -> Receipt:
            cursor = db.execute(
                "INSERT INTO jobs (model, params, status, created_at, updated_at, fingerprint) "
                "VALUES (?, ?, 'SUBMITTING', ?, ?, ?)",
                (submission.model, submission.params_json, now, now, submission.fingerprint),
            )
            job_id = cursor.lastrowid
            assert job_id is not None
            _insert_handle(db, submission, job_id, now)
            if hold is None:
                return Receipt(job_id)
            view, alert = accounts.reserve(db, team=self._team_in(db, submission.team), user=submission.user,
                                           hold=hold, job_id=job_id, handle=submission.handle,
                                           model=submission.model, now=now)
            return Receipt(job_id, view, alert)

        return await self._write(begin)

    async def idempotent_handle(self, team: str, user: str, key: str, now: str) -> RememberedKey | None:
        row = await self._read_point(
            "SELECT k.request_hash, k.handle, j.status FROM idempotency_keys k JOIN handles h ON h.id = k.handle "
            "JOIN jobs j ON j.id = h.job_id WHERE k.team = ? AND k.user_id = ? AND k.idempotency_key = ? "
            "AND k.expires_at > ? AND j.status <> 'REJECTED'",
            (team, user, key, now),
        )
        return RememberedKey(*row) if row else None

    async def purge_idempotency(self, now: str) -> int:
        """Forget expired keys, :data:`PURGE_BATCH` per write, so the write lock is never held for long."""
        purged = 0
        while True:
            batch = await self._write(lambda db: db.execute(
                "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys "
                "WHERE expires_at <= ? LIMIT ?)", (now, PURGE_BATCH)).rowcount)
            purged += batch
            if batch < PURGE_BATCH:
                return purged

    async def find_reusable(self, fingerprint: str, completed_after: str) -> ReusableJob | None:
        row = await self._read_point(
            "SELECT id, status FROM jobs WHERE fingerprint = ? AND (status IN ('QUEUED', 'PROCESSING', "
            "'SUBMITTING', 'INDETERMINATE') OR (status = 'COMPLETED' AND finished_at >= ?)) ORDER BY id DESC LIMIT 1",
            (fingerprint, completed_after),
        )
        return ReusableJob(*row) if row else None

    async def attach_handle(self, submission: Submission, job_id: int, saving: Saving) -> int:
        now = iso_utc()

        def attach(db: Db) -> int:
            _insert_handle(db, submission, job_id, now)
            (saved,) = db.execute(
                "SELECT COALESCE((SELECT spent_delta FROM ledger WHERE job_id = ? AND kind = 'settle'), "
                "(SELECT amount_micros FROM reservations WHERE job_id = ?), 0)",
                (job_id, job_id),
            ).fetchone()
            accounts.insert_ledger(
                db, at=now, kind="saving", team=submission.team, user_id=submission.user, handle=submission.handle,
                job_id=job_id, model=submission.model, period_key=saving.period_key,
                global_period_key=saving.global_period_key, saved_micros=saved, basis=submission.cache.lower(),
            )
            if submission.webhook_url is not None:  # the status it joined at: terminal mode hears only an end,
                (status,) = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                _notify(db, job_id, status, now, handle=submission.handle)  # sync mode hears PROCESSING too
            return saved

        return await self._write(attach)

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str) -> None:
        def submitted(db: Db) -> None:
            now = iso_utc()
            cursor = db.execute(
                "UPDATE jobs SET upstream_id = ?, status = ?, updated_at = ?, checked_at = ? "
                "WHERE id = ? AND status = 'SUBMITTING'",
                (upstream_id, status, now, time.time(), job_id),
            )
            if cursor.rowcount == 1:
                _notify(db, job_id, status, now)

        await self._write(submitted)

    async def mark_rejected(self, job_id: int, reason: str) -> None:
        def rejected(db: Db) -> None:
            now = iso_utc()
            cursor = db.execute(
                "UPDATE jobs SET status = 'REJECTED', error = ?, updated_at = ? WHERE id = ? AND status = 'SUBMITTING'",
                (reason, now, job_id),
            )
            if cursor.rowcount == 1:
                accounts.resolve(db, job_id, Decision.release(reason), now)

        await self._write(rejected)

    async def mark_indeterminate(self, job_id: int, reason: str) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE jobs SET status = 'INDETERMINATE', error = ?, updated_at = ? WHERE id = ? AND status = 'SUBMITTING'",
            (reason, iso_utc(), job_id)))

    async def get_handle(self, handle: str) -> HandleView | None:
        row = await self._read_point(_HANDLE_SELECT + " AND h.id = ?", (handle,))
        return _handle_view(row) if row else None

    async def handles_of(self, team: str, limit: int = 100, before: str | None = None) -> list[HandleView]:
        sql = _HANDLE_SELECT + " AND h.team = ?" + (" AND h.created_at < ?" if before else "")
        sql += " ORDER BY h.created_at DESC, h.id DESC LIMIT ?"
        params = (team, before, limit) if before else (team, limit)
        return [_handle_view(row) for row in await self._read_all(sql, params)]

    async def update_job(self, job_id: int, update: JobUpdate, decision: Decision | None = None) -> bool:
        now = iso_utc()
        terminal = update.status in TERMINAL_STATUSES

        def apply(db: Db) -> bool:
            before = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cursor = db.execute(
                f"""UPDATE jobs SET status = ?, output = ?, error = ?, updated_at = ?, completed_at = ?,
                    checked_at = ?, finished_at = ? WHERE id = ? AND status NOT IN {_TERMINAL}""",
                (
                    update.status,
                    json.dumps(update.output, separators=(",", ":")) if update.output is not None else None,
                    update.error,
                    update.updated_at,
                    update.completed_at,
                    update.checked_at,
                    now if terminal else None,
                    job_id,
                ),
            )
            if cursor.rowcount != 1:
                return False
            if terminal:
                accounts.resolve(db, job_id, decision or Decision.release("ended without a decision"), now)
            if before is None or before[0] != update.status:
                _notify(db, job_id, update.status, now)
            return True

        return await self._write(apply)

    async def active_jobs(self, limit: int = 10_000) -> list[RunningJob]:
        rows = await self._read_all(
            "SELECT id, upstream_id, checked_at FROM jobs WHERE status IN ('QUEUED', 'PROCESSING') "
            "AND upstream_id IS NOT NULL ORDER BY checked_at LIMIT ?",
            (limit,),
        )
        return [RunningJob(*row) for row in rows]

    async def reservation(self, job_id: int) -> Reservation | None:
        row = await self._read_one(_RESERVATION_SELECT + " WHERE r.job_id = ?", (job_id,))
        return _reservation(row) if row else None

    async def open_reservations(self, created_before: str) -> list[Reservation]:
        rows = await self._read_all(
            _RESERVATION_SELECT + " WHERE r.state = 'open' AND r.created_at < ? ORDER BY r.created_at", (created_before,)
        )
        return [_reservation(row) for row in rows]

    # webhooks

    async def due_deliveries(self, now: str, per_team: int = 8, skip: tuple[int, ...] = ()) -> list[Delivery]:
        return await self._read(outbox.due, now, per_team, skip)

    async def delivery_done(self, delivery_id: int, *, delivered: bool, attempts: int, next_attempt_at: str | None,
                            error: str | None) -> None:
        """Record one attempt: delivered, to be retried at ``next_attempt_at``, or (neither) given up."""
        now = iso_utc()
        state = "delivered" if delivered else ("pending" if next_attempt_at else "failed")
        await self._write(lambda db: db.execute(
            "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = COALESCE(?, next_attempt_at), "
            "last_error = ?, finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE id = ?",
            (state, attempts, next_attempt_at, error, state, now, delivery_id),
        ))

    async def webhook_secret(self, team: str, *, rotate: bool = False) -> str:
        """The team's signing secret, created on first use; a new one when ``rotate``."""

        def secret(db: Db) -> str:
            row = db.execute("SELECT webhook_secret FROM teams WHERE name = ?", (team,)).fetchone()
            if row is None:
                raise UnknownTeam(team)
            if row[0] and not rotate:
                return row[0]
            fresh = outbox.new_secret()
            db.execute("UPDATE teams SET webhook_secret = ? WHERE name = ?", (fresh, team))
            return fresh

        if not rotate:
            row = await self._read_one("SELECT webhook_secret FROM teams WHERE name = ?", (team,))
            if row is not None and row[0]:
                return row[0]
        return await self._write(secret)

    # money

    async def budget_view(self, team: str, period_key: str) -> BudgetView:
        return await self._read(lambda db: accounts.budget_view(db, self._team_in(db, team), period_key))

    async def check_hold(self, team: str, user: str, hold: Hold) -> HoldCheck:
        def check(db: Db) -> HoldCheck:
            team_row = self._team_in(db, team)
            return HoldCheck(accounts.budget_view(db, team_row, hold.period_key),
                             accounts.refusal_for(db, team_row, user, hold))

        return await self._read(check)

    async def add_entry(self, team: str, kind: str, amount_micros: int, period_key: str, global_period_key: str,
                        actor: str, note: str) -> LedgerEntry:
        if kind not in ("adjust", "topup"):
            raise ValueError("kind must be adjust or topup")

        def add(db: Db) -> LedgerEntry:
            entry_id = accounts.add_entry(
                db, team=self._team_in(db, team), kind=kind, amount=amount_micros, period_key=period_key,
                global_period_key=global_period_key, actor=actor, note=note, now=iso_utc(),
            )
            row = db.execute(f"SELECT {accounts.LEDGER_COLUMNS} FROM ledger WHERE id = ?", (entry_id,)).fetchone()
            return accounts.ledger_entry(row)

        return await self._write(add)

    async def ledger(self, team: str, period_key: str | None = None, limit: int = 100,
                     before_id: int | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {accounts.LEDGER_COLUMNS} FROM ledger WHERE team = ?"
        params: list[Any] = [team]
        if period_key is not None:
            sql += " AND period_key = ?"
            params.append(period_key)
        if before_id is not None:
            sql += " AND id < ?"
            params.append(before_id)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [accounts.ledger_entry(row) for row in await self._read_all(sql, tuple(params))]

    async def spend_report(self, period_keys: dict[str, str]) -> list[SpendRow]:
        def report(db: Db) -> list[SpendRow]:
            rows = []
            for row in db.execute(f"SELECT {_TEAM_COLUMNS} FROM teams ORDER BY name").fetchall():
                team = Team(*row)
                if team.name not in period_keys:
                    continue
                key = period_keys[team.name]
                view = accounts.budget_view(db, team, key)
                jobs, saved = db.execute(
                    "SELECT COALESCE(SUM(CASE WHEN kind = 'settle' THEN 1 ELSE 0 END), 0), "
                    "COALESCE(SUM(saved_micros), 0) FROM ledger WHERE team = ? AND period_key = ?",
                    (team.name, key),
                ).fetchone()
                rows.append(SpendRow(team.name, key, view.limit_micros, view.credit_micros, view.spent_micros,
                                     view.reserved_micros, view.remaining_micros, jobs, saved))
            return rows

        return await self._read(report)

    async def metric_figures(self, period_keys: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The store-held figures /metrics exports (see ``proxy.metrics.STORE_METRICS``), in USD or counts."""
        usd = 1_000_000

        def figures_of(db: Db) -> dict[str, list[tuple[dict[str, str], float]]]:
            def rows(sql: str) -> list[Any]:
                return db.execute(sql).fetchall()

            figures: dict[str, list[tuple[dict[str, str], float]]] = {}
            spend = rows("SELECT team, model, spent_micros, saved_micros FROM spend_rollup ORDER BY team, model")
            figures["pixazo_proxy_spent_usd"] = [({"team": team, "model": model}, spent / usd)
                                                 for team, model, spent, _ in spend if spent]
            figures["pixazo_proxy_reserved_usd"] = [
                ({"team": team, "model": model}, total / usd) for team, model, total in rows(
                    "SELECT team, model, SUM(amount_micros) FROM reservations WHERE state = 'open' "
                    "GROUP BY team, model")]
            saved: dict[str, int] = {}
            for team, _, _, saving in spend:
                if saving:
                    saved[team] = saved.get(team, 0) + saving
            figures["pixazo_proxy_cache_saved_usd"] = [({"team": team}, total / usd) for team, total in saved.items()]
            limits, used, remaining = [], [], []
            for team, key in sorted(period_keys.items()):
                view = accounts.budget_view(db, self._team_in(db, team), key)
                labels = {"team": team}
                limits.append((labels, (view.limit_micros + view.credit_micros) / usd))
                used.append((labels, (view.spent_micros + view.reserved_micros) / usd))
                remaining.append((labels, view.remaining_micros / usd))
            figures["pixazo_proxy_budget_limit_usd"] = limits
            figures["pixazo_proxy_budget_used_usd"] = used
            figures["pixazo_proxy_budget_remaining_usd"] = remaining
            counts = rows("SELECT model, status, jobs FROM job_counts WHERE jobs > 0 ORDER BY model, status")
            figures["pixazo_proxy_jobs_in_flight"] = [({"model": model, "status": status}, count)
                                                      for model, status, count in counts if status not in TERMINAL_STATUSES]
            figures["pixazo_proxy_jobs_finished"] = [({"model": model, "status": status}, count)
                                                     for model, status, count in counts if status in TERMINAL_STATUSES]
            (depth,) = db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()
            figures["pixazo_proxy_webhook_outbox_depth"] = [({}, depth)]
            return figures

        return await self._read(figures_of)

    async def ledger_mismatches(self) -> list[str]:
        return await self._read(accounts.mismatches)


def _insert_handle(db: Db, submission: Submission, job_id: int, now: str) -> None:
    db.execute(
        "INSERT INTO handles (id, job_id, team, user_id, model, created_at, cache, webhook_url, webhook_mode) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (submission.handle, job_id, submission.team, submission.user, submission.model, now, submission.cache,
         submission.webhook_url, submission.webhook_mode),
    )
    record = submission.idempotency
    if record is not None:
        db.execute(
            "INSERT INTO idempotency_keys (team, user_id, idempotency_key, request_hash, handle, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (team, user_id, idempotency_key) DO UPDATE SET "
            "request_hash = excluded.request_hash, handle = excluded.handle, expires_at = excluded.expires_at",
            (submission.team, submission.user, record.key, record.request_hash, submission.handle, record.expires_at),
        )


def _notify(db: Db, job_id: int, status: str, now: str, handle: str | None = None) -> None:
    """Queue webhook deliveries of the job's new ``status`` (to one handle, or to all of the job's)."""
    sql, params = (_WEBHOOK_HANDLES + " AND h.id = ?", (job_id, handle)) if handle else (_WEBHOOK_HANDLES, (job_id,))
    targets = [(_handle_view(row[2:]), row[0], row[1]) for row in db.execute(sql, params)]
    outbox.enqueue(db, targets, status, status in TERMINAL_STATUSES, now, status_body)


def _handle_view(row: Any) -> HandleView:
    (handle, team, user, model, created_at, job_id, upstream_id, status, output, error, updated_at,
     completed_at, checked_at) = row
    return HandleView(handle, team, user, model, created_at, job_id, upstream_id, status,
                      json.loads(output) if output else None, error, updated_at, completed_at, checked_at)


def _reservation(row: Any) -> Reservation:
    (job_id, handle, team, user, model, period_key, amount, seconds, resolution, basis, state, created_at, params,
     job_status, upstream_id) = row
    return Reservation(job_id, handle, team, user, model, period_key, amount, seconds, resolution, basis, state,
                       created_at, json.loads(params), job_status, upstream_id)


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
