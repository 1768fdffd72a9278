"""The :class:`~proxy.store.Store` protocol over SQL, once for every backend.

:class:`SqlStore` holds the queries and the transaction bodies (see
:mod:`proxy.store.sql`); a backend subclasses it and says only how to run a
body: as a write transaction (:meth:`SqlStore._write`), as a read
(:meth:`SqlStore._read`), and a one-row point read (:meth:`SqlStore._point`).
SQLite (:mod:`proxy.store.sqlite`) runs bodies on its writer and reader
threads; PostgreSQL (:mod:`proxy.store.postgres`) on pooled asyncpg
connections. What the two must agree on, money above all, is therefore
written once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..domain.budget import BudgetView
from ..domain.clock import iso_utc
from ..domain.queueing import QueueRules
from ..domain.ttlcache import TtlCache
from ..domain.values import Hold
from ..domain.views import HandleView
from . import (
    LEDGER_KINDS,
    Admission,
    ConsoleIdentity,
    ConsoleSession,
    DaySpend,
    Decision,
    Delivery,
    Dispatch,
    HandleQuery,
    HoldCheck,
    JobRow,
    JobUpdate,
    LedgerEntry,
    QueuePlace,
    QueueRow,
    Receipt,
    Refusal,
    RememberedKey,
    Reservation,
    ReusableJob,
    RunningJob,
    Saving,
    SpendRow,
    Submission,
    SubmitWindow,
    Team,
    TeamExists,
    Totals,
    UnknownTeam,
    UserSpend,
    accounts,
    check_team_settings,
    outbox,
    queue,
    team_name_problem,
)
from . import transactions as tx
from .sql import Tx, changed, every, one

T = TypeVar("T")

#: How long a team row read for a request is reused; changes made by another process (the CLI, another replica)
#: show within this. Nothing that moves money relies on the copy: reservations read the team in their transaction.
TEAM_ROW_SECONDS = 1.0


class SqlStore:
    """Everything a SQL backend shares; subclasses supply the runners and ``open``/``close``/``ping``."""

    def __init__(self) -> None:
        self._teams: TtlCache[str, Team] = TtlCache(TEAM_ROW_SECONDS, 10_000)

    # how bodies run: the backend's part

    async def _write(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        """Run ``body(*args)`` as one write transaction: committed (durably) when this returns, else rolled back."""
        raise NotImplementedError

    async def _read(self, body: Callable[..., Tx[T]], *args: Any) -> T:
        """Run ``body(*args)`` on a connection that sees only committed state."""
        raise NotImplementedError

    async def _point(self, sql: str, *params: Any) -> Any:
        """One row by key (None if none): the hot reads of a request."""
        return await self._read(one, sql, *params)

    # teams

    async def create_team(self, name: str, budget_limit_micros: int, period: str, **settings: Any) -> Team:
        if (problem := team_name_problem(name)) is not None:
            raise ValueError(problem)
        check_team_settings({"budget_limit_micros": budget_limit_micros, "period": period, **settings})
        now = iso_utc()
        values = {"budget_limit_micros": budget_limit_micros, "period": period, **settings}
        names = ", ".join(values)
        added = await self._write(changed, f"INSERT INTO teams (name, {names}, created_at, updated_at) "
                                           f"VALUES (?, {', '.join('?' for _ in values)}, ?, ?) ON CONFLICT DO NOTHING",
                                  name, *values.values(), now, now)
        if added != 1:
            raise TeamExists(name)
        team = await self.get_team(name)
        assert team is not None
        return team

    async def update_team(self, name: str, **settings: Any) -> Team:
        check_team_settings(settings)
        if settings:
            assignments = ", ".join(f"{column} = ?" for column in settings)
            updated = await self._write(changed, f"UPDATE teams SET {assignments}, updated_at = ? WHERE name = ?",
                                        *settings.values(), iso_utc(), name)
            if updated != 1:
                raise UnknownTeam(name)
            self._teams.forget(name)
        team = await self.get_team(name)
        if team is None:
            raise UnknownTeam(name)
        return team

    async def get_team(self, name: str) -> Team | None:
        """The team's row, read at most :data:`TEAM_ROW_SECONDS` ago; this store's own updates show at once."""
        team = self._teams.get(name)
        if team is None:
            row = await self._point(tx.TEAM_BY_NAME, name)
            if row is None:
                return None
            team = Team(*row)
            self._teams.put(name, team)
        return team

    async def list_teams(self) -> list[Team]:
        return [Team(*row) for row in await self._read(every, f"SELECT {tx.TEAM_COLUMNS} FROM teams ORDER BY name")]

    # handles and jobs

    async def begin_submission(self, submission: Submission, hold: Hold | None,
                               admission: Admission | None = None) -> Receipt:
        """Record the handle and its job, reserve ``hold``; with ``admission``, the job may instead wait in the
        local queue (``Receipt.queued``): then it is not to be sent."""
        return await self._write(tx.begin_submission, submission, hold, iso_utc(), admission)

    async def idempotent_handle(self, team: str, user: str, key: str, now: str) -> RememberedKey | None:
        row = await self._point(
            "SELECT k.request_hash, k.handle, j.status FROM idempotency_keys k JOIN handles h ON h.id = k.handle "
            "JOIN jobs j ON j.id = h.job_id WHERE k.team = ? AND k.user_id = ? AND k.idempotency_key = ? "
            "AND k.expires_at > ? AND j.status <> 'REJECTED'",
            team, user, key, now,
        )
        return RememberedKey(*row) if row else None

    async def purge_idempotency(self, now: str) -> int:
        """Forget expired keys, ``PURGE_BATCH`` (:mod:`proxy.store.transactions`) per write, so no write holds its
        locks for long."""
        purged = 0
        while True:
            batch = await self._write(
                changed, "DELETE FROM idempotency_keys WHERE (team, user_id, idempotency_key) IN ("
                         "SELECT team, user_id, idempotency_key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)",
                now, tx.PURGE_BATCH)
            purged += batch
            if batch < tx.PURGE_BATCH:
                return purged

    async def find_reusable(self, fingerprint: str, completed_after: str) -> ReusableJob | None:
        row = await self._point(
            "SELECT id, status FROM jobs WHERE fingerprint = ? AND (status IN ('QUEUED', 'PROCESSING', "
            "'SUBMITTING', 'INDETERMINATE', 'WAITING') OR (status = 'COMPLETED' AND finished_at >= ?)) ORDER BY id DESC LIMIT 1",
            fingerprint, completed_after,
        )
        return ReusableJob(*row) if row else None

    async def attach_handle(self, submission: Submission, job_id: int, saving: Saving) -> int:
        return await self._write(tx.attach_handle, submission, job_id, saving, iso_utc())

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str, *, quiet: bool = False) -> None:
        """The upstream accepted the job; ``quiet``: its handles already heard this status (a queued job, QUEUED)."""
        await self._write(tx.mark_submitted, job_id, upstream_id, status, iso_utc(), time.time(), quiet)

    async def mark_rejected(self, job_id: int, reason: str) -> None:
        await self._write(tx.mark_rejected, job_id, reason, iso_utc())

    async def mark_indeterminate(self, job_id: int, reason: str) -> None:
        await self._write(changed, "UPDATE jobs SET status = 'INDETERMINATE', error = ?, updated_at = ? "
                                   "WHERE id = ? AND status = 'SUBMITTING'", reason, iso_utc(), job_id)

    async def get_handle(self, handle: str) -> HandleView | None:
        row = await self._point(tx.HANDLE_SELECT + " AND h.id = ?", handle)
        return tx.handle_view(row) if row else None

    async def handles_of(self, team: str, limit: int = 100, before: str | None = None) -> list[HandleView]:
        sql = tx.HANDLE_SELECT + " AND h.team = ?" + (" AND h.created_at < ?" if before else "")
        sql += " ORDER BY h.created_at DESC, h.id DESC LIMIT ?"
        params = (team, before, limit) if before else (team, limit)
        return [tx.handle_view(row) for row in await self._read(every, sql, *params)]

    async def update_job(self, job_id: int, update: JobUpdate, decision: Decision | None = None) -> bool:
        return await self._write(tx.update_job, job_id, update, decision, iso_utc())

    async def active_jobs(self, limit: int = 10_000) -> list[RunningJob]:
        rows = await self._read(every, f"SELECT id, upstream_id, checked_at FROM jobs WHERE {tx.RUNNING} "
                                       "ORDER BY checked_at LIMIT ?", limit)
        return [RunningJob(*row) for row in rows]

    async def job_status(self, job_id: int) -> str | None:
        row = await self._point("SELECT status FROM jobs WHERE id = ?", job_id)
        return str(row[0]) if row else None

    async def claim_refresh(self, job_id: int, now: float, interval: float) -> bool:
        return await self._write(changed, f"UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_until <= ? "
                                          f"AND {tx.RUNNING}",
                                 now + interval, job_id, now) == 1

    async def claim_running(self, now: float, interval: float, limit: int) -> list[RunningJob]:
        return await self._write(tx.claim_running, now, interval, limit)

    async def count_submit(self, team: str, dry_run: bool, now: float, window: float, factor: int) -> SubmitWindow:
        return await self._write(tx.count_submit, team, dry_run, now, window, factor)

    async def take_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        return await self._write(changed, "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) "
                                          "DO UPDATE SET holder = excluded.holder, until = excluded.until "
                                          "WHERE leases.until <= ? OR leases.holder = excluded.holder",
                                 name, holder, now + seconds, now) == 1

    async def reservation(self, job_id: int) -> Reservation | None:
        row = await self._read(one, tx.RESERVATION_SELECT + " WHERE r.job_id = ?", job_id)
        return tx.reservation(row) if row else None

    async def open_reservations(self, created_before: str) -> list[Reservation]:
        rows = await self._read(every, tx.RESERVATION_SELECT + " WHERE r.state = 'open' AND r.created_at < ? "
                                                            "ORDER BY r.created_at", created_before)
        return [tx.reservation(row) for row in rows]

    # the local queue (proxy.queueing; the SQL is proxy.store.queue)

    async def take_next(self, rules: QueueRules, now: float) -> Dispatch | float | None:
        """The next waiting job in fair order, now SUBMITTING with its slot held; else the seconds until the
        rate allows one, or None (nothing may go until something changes). Cheap when nothing waits: a read."""
        gate = await self._point("SELECT queued FROM upstream_gate WHERE id = 1")
        if gate is None or gate[0] <= 0:
            return None
        return await self._write(queue.take_next, rules, now, iso_utc())

    async def requeue(self, dispatch: Dispatch, pause_until: float | None) -> QueuePlace | None:
        return await self._write(queue.requeue, dispatch, pause_until)

    async def queue_place(self, job_id: int) -> QueuePlace | None:
        return await self._read(queue.place, job_id)

    async def cancel_waiting(self, handle: str, who: str) -> None:
        """End the waiting job of ``handle`` as cancelled, released at once; :class:`Conflict` if it cannot be."""
        await self._write(queue.cancel, handle, who, tx.update_job, iso_utc())

    async def expire_waiting(self, now: float, limit: int = 100) -> list[int]:
        """End the waiting jobs past their deadline as ERROR, released; their job ids."""
        ended = []
        for job_id, enqueued_at, deadline in await self._read(queue.expired, now, limit):
            message = queue.EXPIRED.format(waited=round(now - enqueued_at), limit=round(deadline - enqueued_at))
            if await self._write(queue.end_waiting, job_id, message, tx.update_job, iso_utc()):
                ended.append(job_id)
        return ended

    async def queue_rows(self, team: str | None = None, limit: int = 100) -> list[QueueRow]:
        return await self._read(queue.rows, team, limit)

    async def reconcile_gate(self) -> tuple[int, int]:
        """Recount the upstream slots held and the jobs waiting from the jobs themselves: (in flight, waiting)."""
        return await self._write(queue.reconcile)

    # webhooks

    async def due_deliveries(self, now: str, per_team: int = 8, skip: tuple[int, ...] = (),
                             claim_until: str | None = None) -> list[Delivery]:
        if claim_until is None:
            return await self._read(outbox.due, now, per_team, skip)
        return await self._write(outbox.claim, now, per_team, skip, claim_until)

    async def release_claims(self, delivery_ids: tuple[int, ...]) -> None:
        marks = ", ".join("?" for _ in delivery_ids)
        await self._write(changed, f"UPDATE outbox SET claimed_until = '' WHERE id IN ({marks})", *delivery_ids)

    async def delivery_done(self, delivery_id: int, *, delivered: bool, attempts: int, next_attempt_at: str | None,
                            error: str | None) -> None:
        """Record one attempt: delivered, to be retried at ``next_attempt_at``, or (neither) given up."""
        state = "delivered" if delivered else ("pending" if next_attempt_at else "failed")
        await self._write(changed, "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = COALESCE(?, "
                                   "next_attempt_at), last_error = ?, finished_at = ?, claimed_until = '' WHERE id = ?",
                          state, attempts, next_attempt_at, error, None if state == "pending" else iso_utc(),
                          delivery_id)

    async def webhook_secret(self, team: str, *, rotate: bool = False) -> str:
        """The team's signing secret, created on first use; a new one when ``rotate``."""
        if not rotate:
            row = await self._read(one, "SELECT webhook_secret FROM teams WHERE name = ?", team)
            if row is not None and row[0]:
                return str(row[0])
        return await self._write(tx.webhook_secret, team, rotate, outbox.new_secret())

    # money

    async def budget_view(self, team: str, period_key: str) -> BudgetView:
        return await self._read(tx.budget_view, team, period_key)

    async def check_hold(self, team: str, user: str, hold: Hold) -> HoldCheck:
        return await self._read(tx.check_hold, team, user, hold)

    async def add_entry(self, team: str, kind: str, amount_micros: int, period_key: str, global_period_key: str,
                        actor: str, note: str) -> LedgerEntry:
        if kind not in ("adjust", "topup"):
            raise ValueError("kind must be adjust or topup")
        return await self._write(tx.add_entry, team, kind, amount_micros, period_key, global_period_key, actor, note,
                                 iso_utc())

    async def ledger(self, team: str, period_key: str | None = None, limit: int = 100,
                     before_id: int | None = None, kind: str | None = None,
                     user: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {accounts.LEDGER_COLUMNS} FROM ledger WHERE team = ?"
        params: list[Any] = [team]
        for column, value in (("period_key", period_key), ("user_id", user)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if kind is not None:  # a literal from the fixed list, so the planner can use the partial index of rare kinds
            if kind not in LEDGER_KINDS:
                raise ValueError(f"kind must be one of {', '.join(LEDGER_KINDS)}")
            sql += f" AND kind = '{kind}'"
        if before_id is not None:
            sql += " AND id < ?"
            params.append(before_id)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [accounts.ledger_entry(row) for row in await self._read(every, sql, *params)]

    async def daily_spend(self, team: str, first_day: str, last_day: str) -> list[DaySpend]:
        rows = await self._read(every, "SELECT day, period_key, model, resolution, jobs, seconds, charged_micros, hits, "
                                       "saved_micros FROM day_rollup WHERE team = ? AND day >= ? AND day <= ? "
                                       "ORDER BY day, model, resolution, period_key", team, first_day, last_day)
        return [DaySpend(*row) for row in rows]

    async def rebuild_day_rollup(self) -> int:
        return await self._write(accounts.rebuild_day_rollup)

    async def top_users(self, team: str, period_key: str, limit: int = 10) -> list[UserSpend]:
        prefix = accounts.user_scope(team, "")  # 'user:<team>/': a range of the totals' primary key
        rows = await self._read(every, "SELECT scope, spent_micros, reserved_micros FROM budget_totals "
                                       "WHERE scope >= ? AND scope < ? AND period_key = ? "
                                       "ORDER BY spent_micros DESC, scope LIMIT ?",
                                prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1), period_key, limit)
        return [UserSpend(scope[len(prefix):], spent, reserved) for scope, spent, reserved in rows]

    async def global_totals(self, period_key: str) -> Totals:
        spent, reserved, _, _ = await self._read(accounts.totals, accounts.GLOBAL_SCOPE, period_key)
        return Totals(spent, reserved)

    async def find_handles(self, query: HandleQuery, limit: int = 50) -> list[JobRow]:
        sql = tx.JOB_ROWS
        params: list[Any] = []
        for clause, value in (("h.team = ?", query.team), ("h.user_id = ?", query.user), ("h.model = ?", query.model),
                              ("j.status = ?", query.status), ("h.cache = ?", query.cache),
                              ("h.created_at >= ?", query.since), ("h.created_at < ?", query.until)):
            if value is not None:
                sql += f" AND {clause}"
                params.append(value)
        if query.before is not None:
            sql += " AND (h.created_at < ? OR (h.created_at = ? AND h.id < ?))"
            params.extend((query.before[0], query.before[0], query.before[1]))
        sql += " ORDER BY h.created_at DESC, h.id DESC LIMIT ?"
        return [tx.job_row(row) for row in await self._read(every, sql, *params, limit)]

    # the console's sign-in

    async def add_console_link(self, token_hash: str, identity: ConsoleIdentity, expires_at: str) -> None:
        await self._write(tx.add_console_link, token_hash, identity, expires_at, iso_utc())

    async def redeem_console_link(self, token_hash: str, now: str) -> ConsoleIdentity | None:
        row = await self._write(one, "UPDATE console_links SET used_at = ? WHERE token_hash = ? AND used_at IS NULL "
                                     "AND expires_at > ? RETURNING team, user_id, admin", now, token_hash, now)
        return ConsoleIdentity(row[0], row[1], bool(row[2])) if row else None

    async def add_console_session(self, id_hash: str, identity: ConsoleIdentity, csrf: str, now: str,
                                  expires_at: str) -> None:
        await self._write(tx.add_console_session, id_hash, identity, csrf, now, expires_at)

    async def console_session(self, id_hash: str, now: str) -> ConsoleSession | None:
        row = await self._point("SELECT team, user_id, admin, csrf, expires_at FROM console_sessions "
                                "WHERE id_hash = ? AND expires_at > ?", id_hash, now)
        return ConsoleSession(ConsoleIdentity(row[0], row[1], bool(row[2])), row[3], row[4]) if row else None

    async def end_console_session(self, id_hash: str) -> None:
        await self._write(changed, "DELETE FROM console_sessions WHERE id_hash = ?", id_hash)

    async def record_refusal(self, team: str, user: str, model: str, message: str, now: str) -> None:
        await self._write(tx.record_refusal, team, user, model, message, now)

    async def recent_refusals(self, team: str, limit: int = 10) -> list[Refusal]:
        rows = await self._read(every, "SELECT at, user_id, model, message FROM refusals WHERE team = ? "
                                       "ORDER BY id DESC LIMIT ?", team, limit)
        return [Refusal(*row) for row in rows]

    async def spend_report(self, period_keys: dict[str, str]) -> list[SpendRow]:
        return await self._read(tx.spend_report, period_keys)

    async def metric_figures(self, period_keys: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The store-held figures /metrics exports (see ``proxy.metrics.STORE_METRICS``), in USD or counts."""
        return await self._read(tx.metric_figures, period_keys)

    async def ledger_mismatches(self) -> list[str]:
        return await self._read(accounts.mismatches)
