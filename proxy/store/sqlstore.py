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

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..domain.budget import BudgetView
from ..domain.clock import iso_utc
from ..domain.errors import Conflict
from ..domain.queueing import QueueRules
from ..domain.ttlcache import TtlCache
from ..domain.values import Hold
from ..domain.views import TERMINAL_STATUSES, HandleView, status_body
from . import (
    LEDGER_KINDS,
    REFUSALS_KEPT,
    Admission,
    ConsoleIdentity,
    ConsoleSession,
    DaySpend,
    Decision,
    Delivery,
    Dispatch,
    FingerprintTaken,
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
from .sql import Sql, Tx, changed, every, one

T = TypeVar("T")

HANDLE_SELECT = """
    SELECT h.id, h.team, h.user_id, h.model, h.created_at,
           j.id, j.upstream_id, j.status, j.output, j.error, j.updated_at, j.completed_at, j.checked_at
    FROM handles h JOIN jobs j ON j.id = h.job_id
    WHERE (j.status NOT IN ('SUBMITTING', 'INDETERMINATE', 'REJECTED') OR (j.sent_at IS NOT NULL AND j.status <> 'REJECTED'))
"""
# (A job sent from the local queue has a sent_at: its handles were answered 202 already, so they stay visible while
# it is being sent, and if its answer is lost, as QUEUED until the sweeper resolves it.)
TEAM_COLUMNS = ("name, budget_limit_micros, period, created_at, soft_threshold_percent, user_cap_micros, "
                "max_concurrent_jobs, max_submits_per_minute, updated_at, weight, on_limit")
TEAM_BY_NAME = f"SELECT {TEAM_COLUMNS} FROM teams WHERE name = ?"
RESERVATION_SELECT = """
    SELECT r.job_id, r.handle, r.team, r.user_id, r.model, r.period_key, r.amount_micros, r.seconds, r.resolution,
           r.basis, r.state, r.created_at, j.params, j.status, j.upstream_id, COALESCE(j.sent_at, r.created_at)
    FROM reservations r JOIN jobs j ON j.id = r.job_id
"""
#: The handles of one job that asked for webhooks: (url, mode, then the HANDLE_SELECT columns).
WEBHOOK_HANDLES = (HANDLE_SELECT.replace("SELECT h.id,", "SELECT h.webhook_url, h.webhook_mode, h.id,")
                   + " AND h.job_id = ? AND h.webhook_url IS NOT NULL")
TERMINAL = "(" + ", ".join(f"'{status}'" for status in TERMINAL_STATUSES) + ")"
#: Jobs whose fingerprint a new identical submit must join rather than send again (see jobs_live_fingerprint).
LIVE = "('SUBMITTING', 'QUEUED', 'PROCESSING', 'INDETERMINATE', 'WAITING')"
#: What a running job may be leased for: a status call, however reached.
RUNNING = "status IN ('QUEUED', 'PROCESSING') AND upstream_id IS NOT NULL"
#: Expired idempotency keys deleted per write transaction.
PURGE_BATCH = 1000
#: How long a team row read for a request is reused; changes made by another process (the CLI, another replica)
#: show within this. Nothing that moves money relies on the copy: reservations read the team in their transaction.
TEAM_ROW_SECONDS = 1.0
USD = 1_000_000


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
            row = await self._point(TEAM_BY_NAME, name)
            if row is None:
                return None
            team = Team(*row)
            self._teams.put(name, team)
        return team

    async def list_teams(self) -> list[Team]:
        return [Team(*row) for row in await self._read(every, f"SELECT {TEAM_COLUMNS} FROM teams ORDER BY name")]

    # handles and jobs

    async def begin_submission(self, submission: Submission, hold: Hold | None,
                               admission: Admission | None = None) -> Receipt:
        """Record the handle and its job, reserve ``hold``; with ``admission``, the job may instead wait in the
        local queue (``Receipt.queued``): then it is not to be sent."""
        return await self._write(_begin_submission, submission, hold, iso_utc(), admission)

    async def idempotent_handle(self, team: str, user: str, key: str, now: str) -> RememberedKey | None:
        row = await self._point(
            "SELECT k.request_hash, k.handle, j.status FROM idempotency_keys k JOIN handles h ON h.id = k.handle "
            "JOIN jobs j ON j.id = h.job_id WHERE k.team = ? AND k.user_id = ? AND k.idempotency_key = ? "
            "AND k.expires_at > ? AND j.status <> 'REJECTED'",
            team, user, key, now,
        )
        return RememberedKey(*row) if row else None

    async def purge_idempotency(self, now: str) -> int:
        """Forget expired keys, :data:`PURGE_BATCH` per write, so no write holds its locks for long."""
        purged = 0
        while True:
            batch = await self._write(
                changed, "DELETE FROM idempotency_keys WHERE (team, user_id, idempotency_key) IN ("
                         "SELECT team, user_id, idempotency_key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)",
                now, PURGE_BATCH)
            purged += batch
            if batch < PURGE_BATCH:
                return purged

    async def find_reusable(self, fingerprint: str, completed_after: str) -> ReusableJob | None:
        row = await self._point(
            "SELECT id, status FROM jobs WHERE fingerprint = ? AND (status IN ('QUEUED', 'PROCESSING', "
            "'SUBMITTING', 'INDETERMINATE', 'WAITING') OR (status = 'COMPLETED' AND finished_at >= ?)) ORDER BY id DESC LIMIT 1",
            fingerprint, completed_after,
        )
        return ReusableJob(*row) if row else None

    async def attach_handle(self, submission: Submission, job_id: int, saving: Saving) -> int:
        return await self._write(_attach_handle, submission, job_id, saving, iso_utc())

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str, *, quiet: bool = False) -> None:
        """The upstream accepted the job; ``quiet``: its handles already heard this status (a queued job, QUEUED)."""
        await self._write(_mark_submitted, job_id, upstream_id, status, iso_utc(), time.time(), quiet)

    async def mark_rejected(self, job_id: int, reason: str) -> None:
        await self._write(_mark_rejected, job_id, reason, iso_utc())

    async def mark_indeterminate(self, job_id: int, reason: str) -> None:
        await self._write(changed, "UPDATE jobs SET status = 'INDETERMINATE', error = ?, updated_at = ? "
                                   "WHERE id = ? AND status = 'SUBMITTING'", reason, iso_utc(), job_id)

    async def get_handle(self, handle: str) -> HandleView | None:
        row = await self._point(HANDLE_SELECT + " AND h.id = ?", handle)
        return handle_view(row) if row else None

    async def handles_of(self, team: str, limit: int = 100, before: str | None = None) -> list[HandleView]:
        sql = HANDLE_SELECT + " AND h.team = ?" + (" AND h.created_at < ?" if before else "")
        sql += " ORDER BY h.created_at DESC, h.id DESC LIMIT ?"
        params = (team, before, limit) if before else (team, limit)
        return [handle_view(row) for row in await self._read(every, sql, *params)]

    async def update_job(self, job_id: int, update: JobUpdate, decision: Decision | None = None) -> bool:
        return await self._write(_update_job, job_id, update, decision, iso_utc())

    async def active_jobs(self, limit: int = 10_000) -> list[RunningJob]:
        rows = await self._read(every, f"SELECT id, upstream_id, checked_at FROM jobs WHERE {RUNNING} "
                                       "ORDER BY checked_at LIMIT ?", limit)
        return [RunningJob(*row) for row in rows]

    async def job_status(self, job_id: int) -> str | None:
        row = await self._point("SELECT status FROM jobs WHERE id = ?", job_id)
        return str(row[0]) if row else None

    async def claim_refresh(self, job_id: int, now: float, interval: float) -> bool:
        return await self._write(changed, f"UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_until <= ? "
                                          f"AND {RUNNING}",
                                 now + interval, job_id, now) == 1

    async def claim_running(self, now: float, interval: float, limit: int) -> list[RunningJob]:
        return await self._write(_claim_running, now, interval, limit)

    async def count_submit(self, team: str, dry_run: bool, now: float, window: float, factor: int) -> SubmitWindow:
        return await self._write(_count_submit, team, dry_run, now, window, factor)

    async def take_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        return await self._write(changed, "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) "
                                          "DO UPDATE SET holder = excluded.holder, until = excluded.until "
                                          "WHERE leases.until <= ? OR leases.holder = excluded.holder",
                                 name, holder, now + seconds, now) == 1

    async def reservation(self, job_id: int) -> Reservation | None:
        row = await self._read(one, RESERVATION_SELECT + " WHERE r.job_id = ?", job_id)
        return reservation(row) if row else None

    async def open_reservations(self, created_before: str) -> list[Reservation]:
        rows = await self._read(every, RESERVATION_SELECT + " WHERE r.state = 'open' AND r.created_at < ? "
                                                            "ORDER BY r.created_at", created_before)
        return [reservation(row) for row in rows]

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
        await self._write(queue.cancel, handle, who, _update_job, iso_utc())

    async def expire_waiting(self, now: float, limit: int = 100) -> list[int]:
        """End the waiting jobs past their deadline as ERROR, released; their job ids."""
        ended = []
        for job_id, enqueued_at, deadline in await self._read(queue.expired, now, limit):
            message = queue.EXPIRED.format(waited=round(now - enqueued_at), limit=round(deadline - enqueued_at))
            if await self._write(queue.end_waiting, job_id, message, _update_job, iso_utc()):
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
        return await self._write(_webhook_secret, team, rotate, outbox.new_secret())

    # money

    async def budget_view(self, team: str, period_key: str) -> BudgetView:
        return await self._read(_budget_view, team, period_key)

    async def check_hold(self, team: str, user: str, hold: Hold) -> HoldCheck:
        return await self._read(_check_hold, team, user, hold)

    async def add_entry(self, team: str, kind: str, amount_micros: int, period_key: str, global_period_key: str,
                        actor: str, note: str) -> LedgerEntry:
        if kind not in ("adjust", "topup"):
            raise ValueError("kind must be adjust or topup")
        return await self._write(_add_entry, team, kind, amount_micros, period_key, global_period_key, actor, note,
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
        sql = JOB_ROWS
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
        return [job_row(row) for row in await self._read(every, sql, *params, limit)]

    # the console's sign-in

    async def add_console_link(self, token_hash: str, identity: ConsoleIdentity, expires_at: str) -> None:
        await self._write(_add_console_link, token_hash, identity, expires_at, iso_utc())

    async def redeem_console_link(self, token_hash: str, now: str) -> ConsoleIdentity | None:
        row = await self._write(one, "UPDATE console_links SET used_at = ? WHERE token_hash = ? AND used_at IS NULL "
                                     "AND expires_at > ? RETURNING team, user_id, admin", now, token_hash, now)
        return ConsoleIdentity(row[0], row[1], bool(row[2])) if row else None

    async def add_console_session(self, id_hash: str, identity: ConsoleIdentity, csrf: str, now: str,
                                  expires_at: str) -> None:
        await self._write(_add_console_session, id_hash, identity, csrf, now, expires_at)

    async def console_session(self, id_hash: str, now: str) -> ConsoleSession | None:
        row = await self._point("SELECT team, user_id, admin, csrf, expires_at FROM console_sessions "
                                "WHERE id_hash = ? AND expires_at > ?", id_hash, now)
        return ConsoleSession(ConsoleIdentity(row[0], row[1], bool(row[2])), row[3], row[4]) if row else None

    async def end_console_session(self, id_hash: str) -> None:
        await self._write(changed, "DELETE FROM console_sessions WHERE id_hash = ?", id_hash)

    async def record_refusal(self, team: str, user: str, model: str, message: str, now: str) -> None:
        await self._write(_record_refusal, team, user, model, message, now)

    async def recent_refusals(self, team: str, limit: int = 10) -> list[Refusal]:
        rows = await self._read(every, "SELECT at, user_id, model, message FROM refusals WHERE team = ? "
                                       "ORDER BY id DESC LIMIT ?", team, limit)
        return [Refusal(*row) for row in rows]

    async def spend_report(self, period_keys: dict[str, str]) -> list[SpendRow]:
        return await self._read(_spend_report, period_keys)

    async def metric_figures(self, period_keys: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The store-held figures /metrics exports (see ``proxy.metrics.STORE_METRICS``), in USD or counts."""
        return await self._read(_metric_figures, period_keys)

    async def ledger_mismatches(self) -> list[str]:
        return await self._read(accounts.mismatches)


# transaction bodies


def team_in(name: str) -> Tx[Team]:
    row = yield from one(TEAM_BY_NAME, name)
    if row is None:
        raise UnknownTeam(name)
    return Team(*row)


def _begin_submission(submission: Submission, hold: Hold | None, now: str,
                      admission: Admission | None = None) -> Tx[Receipt]:
    team = None
    through_gate = False
    if admission is not None and hold is not None:
        team = yield from team_in(submission.team)
        through_gate = yield from queue.gated(team, admission.rules, admission.now)
        if through_gate:
            yield from queue.lock_gate()
    claims = submission.cache == "MISS" and submission.fingerprint is not None
    inserted = yield from one("INSERT INTO jobs (model, params, status, created_at, updated_at, fingerprint, "
                              "claims_fingerprint) VALUES (?, ?, 'SUBMITTING', ?, ?, ?, ?) ON CONFLICT DO NOTHING "
                              "RETURNING id", submission.model, submission.params_json, now, now, submission.fingerprint,
                              1 if claims else 0)
    if inserted is None:  # a live job holds this fingerprint (jobs_live_fingerprint): another process sends it
        holder = yield from one(f"SELECT id, status FROM jobs WHERE fingerprint = ? AND claims_fingerprint = 1 AND "
                                f"status IN {LIVE}", submission.fingerprint)
        if holder is None:  # it ended between the two statements: the caller tries again
            raise FingerprintTaken(0, "ENDED")
        raise FingerprintTaken(int(holder[0]), str(holder[1]))
    (job_id,) = inserted
    yield from _insert_handle(submission, job_id, now)
    if hold is None:
        return Receipt(job_id)
    team = team or (yield from team_in(submission.team))
    place = None
    if admission is not None:  # before the money (the same lock order everywhere)
        place = yield from queue.admit(team, submission.user, job_id, submission.handle, submission.model, admission,
                                       through_gate)
    view, alert = yield from accounts.reserve(team=team, user=submission.user, hold=hold, job_id=job_id,
                                              handle=submission.handle, model=submission.model, now=now,
                                              count_jobs=admission is None)
    if place is not None and submission.webhook_url is not None:  # sync mode hears the local QUEUED too
        yield from _notify(job_id, "QUEUED", now, handle=submission.handle)
    return Receipt(job_id, view, alert, place)


def _attach_handle(submission: Submission, job_id: int, saving: Saving, now: str) -> Tx[int]:
    yield from _insert_handle(submission, job_id, now)
    (saved,) = yield from one(
        "SELECT COALESCE((SELECT spent_delta FROM ledger WHERE job_id = ? AND kind = 'settle'), "
        "(SELECT amount_micros FROM reservations WHERE job_id = ?), 0)", job_id, job_id)
    yield from accounts.insert_ledger(
        at=now, kind="saving", team=submission.team, user_id=submission.user, handle=submission.handle,
        job_id=job_id, model=submission.model, period_key=saving.period_key,
        global_period_key=saving.global_period_key, saved_micros=saved, basis=submission.cache.lower(),
    )
    if submission.webhook_url is not None:  # the status it joined at: terminal mode hears only an end,
        (status,) = yield from one("SELECT status FROM jobs WHERE id = ?", job_id)
        yield from _notify(job_id, status, now, handle=submission.handle)  # sync mode hears PROCESSING too
    return int(saved)


def _mark_submitted(job_id: int, upstream_id: str, status: str, now: str, checked_at: float,
                    quiet: bool = False) -> Tx[None]:
    marked = yield from changed("UPDATE jobs SET upstream_id = ?, status = ?, updated_at = ?, checked_at = ? "
                                "WHERE id = ? AND status = 'SUBMITTING'", upstream_id, status, now, checked_at, job_id)
    if marked == 1 and not quiet:
        yield from _notify(job_id, status, now)


def _mark_rejected(job_id: int, reason: str, now: str) -> Tx[None]:
    rejected = yield from changed("UPDATE jobs SET status = 'REJECTED', error = ?, updated_at = ? "
                                  "WHERE id = ? AND status = 'SUBMITTING'", reason, now, job_id)
    if rejected == 1:
        yield from accounts.resolve(job_id, Decision.release(reason), now)


def _update_job(job_id: int, update: JobUpdate, decision: Decision | None, now: str) -> Tx[bool]:
    terminal = update.status in TERMINAL_STATUSES
    before = yield from one("SELECT status FROM jobs WHERE id = ?", job_id)
    applied = yield from changed(
        f"""UPDATE jobs SET status = ?, output = ?, error = ?, updated_at = ?, completed_at = ?,
            checked_at = ?, finished_at = ? WHERE id = ? AND status NOT IN {TERMINAL}""",
        update.status,
        json.dumps(update.output, separators=(",", ":")) if update.output is not None else None,
        update.error,
        update.updated_at,
        update.completed_at,
        update.checked_at,
        now if terminal else None,
        job_id,
    )
    if applied != 1:
        return False
    if terminal:
        yield from accounts.resolve(job_id, decision or Decision.release("ended without a decision"), now)
    if before is None or before[0] != update.status:
        yield from _notify(job_id, update.status, now)
    return True


def _claim_running(now: float, interval: float, limit: int) -> Tx[list[RunningJob]]:
    select = f"SELECT id FROM jobs WHERE {RUNNING} AND checked_at <= ? AND lease_until <= ? ORDER BY checked_at LIMIT ?"
    rows = yield Sql(f"UPDATE jobs SET lease_until = ? WHERE id IN ({select}) RETURNING id, upstream_id, checked_at",
                     (now + interval, now - interval, now, limit),
                     postgres=f"UPDATE jobs SET lease_until = ? WHERE id IN ({select} FOR UPDATE SKIP LOCKED) "
                              "RETURNING id, upstream_id, checked_at")
    return sorted((RunningJob(*row) for row in rows.fetchall()), key=lambda job: job.checked_at)


def _count_submit(team: str, dry_run: bool, now: float, window: float, factor: int) -> Tx[SubmitWindow]:
    yield Sql("SELECT name FROM teams WHERE name = ? FOR UPDATE", (team,), postgres_only=True)  # one at a time
    row = yield from one("SELECT max_submits_per_minute FROM teams WHERE name = ?", team)
    if row is None:
        raise UnknownTeam(team)
    if row[0] is None:
        return SubmitWindow(None, 0, None)
    limit = int(row[0]) * (factor if dry_run else 1)
    kind = 1 if dry_run else 0
    yield Sql("DELETE FROM submit_times WHERE team = ? AND dry_run = ? AND at <= ?", (team, kind, now - window))
    used, oldest = yield from one("SELECT COUNT(*), MIN(at) FROM submit_times WHERE team = ? AND dry_run = ?",
                                  team, kind)
    if used >= limit:
        return SubmitWindow(limit, used, max(0.0, oldest + window - now))
    yield Sql("INSERT INTO submit_times (team, dry_run, at) VALUES (?, ?, ?)", (team, kind, now))
    return SubmitWindow(limit, used + 1, None)


def _webhook_secret(team: str, rotate: bool, fresh: str) -> Tx[str]:
    row = yield from one("SELECT webhook_secret FROM teams WHERE name = ?", team)
    if row is None:
        raise UnknownTeam(team)
    if row[0] and not rotate:
        return str(row[0])
    yield Sql("UPDATE teams SET webhook_secret = ? WHERE name = ?", (fresh, team))
    return fresh


def _budget_view(team: str, period_key: str) -> Tx[BudgetView]:
    return (yield from accounts.budget_view((yield from team_in(team)), period_key))


def _check_hold(team: str, user: str, hold: Hold) -> Tx[HoldCheck]:
    row = yield from team_in(team)
    return HoldCheck((yield from accounts.budget_view(row, hold.period_key)),
                     (yield from accounts.refusal_for(row, user, hold)))


def _add_entry(team: str, kind: str, amount: int, period_key: str, global_period_key: str, actor: str, note: str,
               now: str) -> Tx[LedgerEntry]:
    entry_id = yield from accounts.add_entry(team=(yield from team_in(team)), kind=kind, amount=amount,
                                             period_key=period_key, global_period_key=global_period_key,
                                             actor=actor, note=note, now=now)
    row = yield from one(f"SELECT {accounts.LEDGER_COLUMNS} FROM ledger WHERE id = ?", entry_id)
    return accounts.ledger_entry(row)


def _spend_report(period_keys: dict[str, str]) -> Tx[list[SpendRow]]:
    rows = []
    for row in (yield from every(f"SELECT {TEAM_COLUMNS} FROM teams ORDER BY name")):
        team = Team(*row)
        if team.name not in period_keys:
            continue
        key = period_keys[team.name]
        view = yield from accounts.budget_view(team, key)
        jobs, saved = yield from one(  # the day rollup's lines of the period: exactly the ledger's, without its rows
            "SELECT COALESCE(SUM(jobs), 0), COALESCE(SUM(saved_micros), 0) FROM day_rollup "
            "WHERE team = ? AND period_key = ?", team.name, key)
        rows.append(SpendRow(team.name, key, view.limit_micros, view.credit_micros, view.spent_micros,
                             view.reserved_micros, view.remaining_micros, jobs, saved))
    return rows


def _metric_figures(period_keys: dict[str, str]) -> Tx[dict[str, list[tuple[dict[str, str], float]]]]:
    figures: dict[str, list[tuple[dict[str, str], float]]] = {}
    spend = yield from every("SELECT team, model, spent_micros, saved_micros FROM spend_rollup ORDER BY team, model")
    figures["pixazo_proxy_spent_usd"] = [({"team": team, "model": model}, spent / USD)
                                         for team, model, spent, _ in spend if spent]
    reserved = yield from every("SELECT team, model, SUM(amount_micros) FROM reservations WHERE state = 'open' "
                                "GROUP BY team, model ORDER BY team, model")
    figures["pixazo_proxy_reserved_usd"] = [({"team": team, "model": model}, total / USD)
                                            for team, model, total in reserved]
    saved: dict[str, int] = {}
    for team, _, _, saving in spend:
        if saving:
            saved[team] = saved.get(team, 0) + saving
    figures["pixazo_proxy_cache_saved_usd"] = [({"team": team}, total / USD) for team, total in saved.items()]
    limits, used, remaining = [], [], []
    for team, key in sorted(period_keys.items()):
        view = yield from accounts.budget_view((yield from team_in(team)), key)
        labels = {"team": team}
        limits.append((labels, (view.limit_micros + view.credit_micros) / USD))
        used.append((labels, (view.spent_micros + view.reserved_micros) / USD))
        remaining.append((labels, view.remaining_micros / USD))
    figures["pixazo_proxy_budget_limit_usd"] = limits
    figures["pixazo_proxy_budget_used_usd"] = used
    figures["pixazo_proxy_budget_remaining_usd"] = remaining
    counts = yield from every("SELECT model, status, jobs FROM job_counts WHERE jobs > 0 ORDER BY model, status")
    figures["pixazo_proxy_jobs_in_flight"] = [({"model": model, "status": status}, count)
                                              for model, status, count in counts if status not in TERMINAL_STATUSES]
    figures["pixazo_proxy_jobs_finished"] = [({"model": model, "status": status}, count)
                                             for model, status, count in counts if status in TERMINAL_STATUSES]
    (depth,) = yield from one("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
    figures["pixazo_proxy_webhook_outbox_depth"] = [({}, depth)]
    waiting = {team: (count, oldest) for team, count, oldest in (yield from every(
        "SELECT team, COUNT(*), MIN(enqueued_at) FROM queued_jobs GROUP BY team"))}
    now = time.time()
    queues = {team: waiting.get(team, (0, now)) for team in sorted(set(period_keys) | set(waiting))}  # 0s shown too
    figures["pixazo_proxy_queue_depth"] = [({"team": team}, count) for team, (count, _) in queues.items()]
    figures["pixazo_proxy_queue_oldest_wait_seconds"] = [({"team": team}, max(0.0, now - float(oldest)))
                                                         for team, (_, oldest) in queues.items()]
    (in_flight,) = yield from one("SELECT in_flight FROM upstream_gate WHERE id = 1")
    figures["pixazo_proxy_upstream_slots_in_use"] = [({}, in_flight)]
    return figures


def _insert_handle(submission: Submission, job_id: int, now: str) -> Tx[None]:
    yield Sql(
        "INSERT INTO handles (id, job_id, team, user_id, model, created_at, cache, webhook_url, webhook_mode) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (submission.handle, job_id, submission.team, submission.user, submission.model, now, submission.cache,
         submission.webhook_url, submission.webhook_mode),
    )
    record = submission.idempotency
    if record is not None:
        rows = yield Sql(
            "INSERT INTO idempotency_keys (team, user_id, idempotency_key, request_hash, handle, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (team, user_id, idempotency_key) DO UPDATE SET "
            "request_hash = excluded.request_hash, handle = excluded.handle, expires_at = excluded.expires_at "
            "WHERE idempotency_keys.expires_at <= ? OR EXISTS (SELECT 1 FROM handles h JOIN jobs j ON j.id = h.job_id "
            "WHERE h.id = idempotency_keys.handle AND j.status = 'REJECTED')",
            (submission.team, submission.user, record.key, record.request_hash, submission.handle, record.expires_at,
             now),
        )
        if rows.rowcount != 1:  # the key names a live handle: another process is submitting with it right now
            raise Conflict("A request with this Idempotency-Key is still being processed; retry shortly")


def _notify(job_id: int, status: str, now: str, handle: str | None = None) -> Tx[None]:
    """Queue webhook deliveries of the job's new ``status`` (to one handle, or to all of the job's)."""
    rows = yield from (every(WEBHOOK_HANDLES + " AND h.id = ?", job_id, handle) if handle
                       else every(WEBHOOK_HANDLES, job_id))
    targets = [(handle_view(row[2:]), row[0], row[1]) for row in rows]
    yield from outbox.enqueue(targets, status, status in TERMINAL_STATUSES, now, status_body)


def _add_console_link(token_hash: str, identity: ConsoleIdentity, expires_at: str, now: str) -> Tx[None]:
    yield Sql("DELETE FROM console_links WHERE expires_at <= ?", (now,))  # spent or not, an expired link is gone
    yield Sql("INSERT INTO console_links (token_hash, team, user_id, admin, expires_at) VALUES (?, ?, ?, ?, ?)",
              (token_hash, identity.team, identity.user, int(identity.admin), expires_at))


def _add_console_session(id_hash: str, identity: ConsoleIdentity, csrf: str, now: str, expires_at: str) -> Tx[None]:
    yield Sql("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
    yield Sql("INSERT INTO console_sessions (id_hash, team, user_id, admin, csrf, created_at, expires_at) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)", (id_hash, identity.team, identity.user, int(identity.admin), csrf, now,
                                               expires_at))


def _record_refusal(team: str, user: str, model: str, message: str, now: str) -> Tx[None]:
    (entry_id,) = yield from one("INSERT INTO refusals (team, user_id, at, model, message) VALUES (?, ?, ?, ?, ?) "
                                 "RETURNING id", team, user, now, model, message)
    yield Sql("DELETE FROM refusals WHERE team = ? AND id <= ?", (team, int(entry_id) - REFUSALS_KEPT))


#: A handle, its job, the reservation it made, its settlement (or release) and its saving (a hit or a join).
#: Handles drive the join, newest first (CROSS JOIN fixes SQLite's join order; PostgreSQL plans it as any join):
#: led by jobs, a status filter that nearly every job matches had SQLite read them all and sort (12.6 s at 1M).
JOB_ROWS = """
    SELECT h.id, h.team, h.user_id, h.model, h.created_at, h.cache, j.status, j.params, j.output, j.error,
           j.updated_at, j.completed_at, r.amount_micros, s.spent_delta, COALESCE(s.basis, v.basis), v.saved_micros
    FROM handles h CROSS JOIN jobs j
    LEFT JOIN reservations r ON r.job_id = h.job_id AND r.handle = h.id
    LEFT JOIN ledger s ON s.job_id = h.job_id AND s.kind IN ('settle', 'release') AND s.handle = h.id
    LEFT JOIN ledger v ON v.job_id = h.job_id AND v.kind = 'saving' AND v.handle = h.id
    WHERE j.id = h.job_id AND j.status NOT IN ('SUBMITTING', 'REJECTED')
"""


def job_row(row: Any) -> JobRow:
    (handle, team, user, model, created_at, cache, status, params, output, error, updated_at, completed_at,
     estimate, charged, basis, saved) = row
    return JobRow(handle, team, user, model, created_at, cache, status, json.loads(params),
                  json.loads(output) if output else None, error, updated_at, completed_at, estimate, charged, basis,
                  saved)


def handle_view(row: Any) -> HandleView:
    (handle, team, user, model, created_at, job_id, upstream_id, status, output, error, updated_at,
     completed_at, checked_at) = row
    return HandleView(handle, team, user, model, created_at, job_id, upstream_id, status,
                      json.loads(output) if output else None, error, updated_at, completed_at, checked_at)


def reservation(row: Any) -> Reservation:
    (job_id, handle, team, user, model, period_key, amount, seconds, resolution, basis, state, created_at, params,
     job_status, upstream_id, since) = row
    return Reservation(job_id, handle, team, user, model, period_key, amount, seconds, resolution, basis, state,
                       created_at, json.loads(params), job_status, upstream_id, since)
