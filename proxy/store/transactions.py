"""The transaction bodies :class:`~proxy.store.sqlstore.SqlStore` runs, and the SQL they share: generators that yield
statements and are sent their rows (:mod:`proxy.store.sql`), so each backend only says how to run one."""

from __future__ import annotations

import json
import time
from typing import Any

from ..domain.budget import BudgetView
from ..domain.errors import Conflict
from ..domain.values import Hold
from ..domain.views import TERMINAL_STATUSES, HandleView, status_body
from . import (
    REFUSALS_KEPT,
    Admission,
    ConsoleIdentity,
    Decision,
    FingerprintTaken,
    HoldCheck,
    JobRow,
    JobUpdate,
    LedgerEntry,
    Receipt,
    Reservation,
    RunningJob,
    Saving,
    SpendRow,
    Submission,
    SubmitWindow,
    Team,
    UnknownTeam,
    accounts,
    outbox,
    queue,
)
from .sql import Sql, Tx, changed, every, one

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
USD = 1_000_000



def team_in(name: str) -> Tx[Team]:
    row = yield from one(TEAM_BY_NAME, name)
    if row is None:
        raise UnknownTeam(name)
    return Team(*row)


def begin_submission(submission: Submission, hold: Hold | None, now: str,
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
    yield from insert_handle(submission, job_id, now)
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
        yield from notify(job_id, "QUEUED", now, handle=submission.handle)
    return Receipt(job_id, view, alert, place)


def attach_handle(submission: Submission, job_id: int, saving: Saving, now: str) -> Tx[int]:
    yield from insert_handle(submission, job_id, now)
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
        yield from notify(job_id, status, now, handle=submission.handle)  # sync mode hears PROCESSING too
    return int(saved)


def mark_submitted(job_id: int, upstream_id: str, status: str, now: str, checked_at: float,
                    quiet: bool = False) -> Tx[None]:
    marked = yield from changed("UPDATE jobs SET upstream_id = ?, status = ?, updated_at = ?, checked_at = ? "
                                "WHERE id = ? AND status = 'SUBMITTING'", upstream_id, status, now, checked_at, job_id)
    if marked == 1 and not quiet:
        yield from notify(job_id, status, now)


def mark_rejected(job_id: int, reason: str, now: str) -> Tx[None]:
    rejected = yield from changed("UPDATE jobs SET status = 'REJECTED', error = ?, updated_at = ? "
                                  "WHERE id = ? AND status = 'SUBMITTING'", reason, now, job_id)
    if rejected == 1:
        yield from accounts.resolve(job_id, Decision.release(reason), now)


def update_job(job_id: int, update: JobUpdate, decision: Decision | None, now: str) -> Tx[bool]:
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
        yield from notify(job_id, update.status, now)
    return True


def claim_running(now: float, interval: float, limit: int) -> Tx[list[RunningJob]]:
    select = f"SELECT id FROM jobs WHERE {RUNNING} AND checked_at <= ? AND lease_until <= ? ORDER BY checked_at LIMIT ?"
    rows = yield Sql(f"UPDATE jobs SET lease_until = ? WHERE id IN ({select}) RETURNING id, upstream_id, checked_at",
                     (now + interval, now - interval, now, limit),
                     postgres=f"UPDATE jobs SET lease_until = ? WHERE id IN ({select} FOR UPDATE SKIP LOCKED) "
                              "RETURNING id, upstream_id, checked_at")
    return sorted((RunningJob(*row) for row in rows.fetchall()), key=lambda job: job.checked_at)


def count_submit(team: str, dry_run: bool, now: float, window: float, factor: int) -> Tx[SubmitWindow]:
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


def webhook_secret(team: str, rotate: bool, fresh: str) -> Tx[str]:
    row = yield from one("SELECT webhook_secret FROM teams WHERE name = ?", team)
    if row is None:
        raise UnknownTeam(team)
    if row[0] and not rotate:
        return str(row[0])
    yield Sql("UPDATE teams SET webhook_secret = ? WHERE name = ?", (fresh, team))
    return fresh


def budget_view(team: str, period_key: str) -> Tx[BudgetView]:
    return (yield from accounts.budget_view((yield from team_in(team)), period_key))


def check_hold(team: str, user: str, hold: Hold) -> Tx[HoldCheck]:
    row = yield from team_in(team)
    return HoldCheck((yield from accounts.budget_view(row, hold.period_key)),
                     (yield from accounts.refusal_for(row, user, hold)))


def add_entry(team: str, kind: str, amount: int, period_key: str, global_period_key: str, actor: str, note: str,
               now: str) -> Tx[LedgerEntry]:
    entry_id = yield from accounts.add_entry(team=(yield from team_in(team)), kind=kind, amount=amount,
                                             period_key=period_key, global_period_key=global_period_key,
                                             actor=actor, note=note, now=now)
    row = yield from one(f"SELECT {accounts.LEDGER_COLUMNS} FROM ledger WHERE id = ?", entry_id)
    return accounts.ledger_entry(row)


def spend_report(period_keys: dict[str, str]) -> Tx[list[SpendRow]]:
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


def metric_figures(period_keys: dict[str, str]) -> Tx[dict[str, list[tuple[dict[str, str], float]]]]:
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


def insert_handle(submission: Submission, job_id: int, now: str) -> Tx[None]:
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


def notify(job_id: int, status: str, now: str, handle: str | None = None) -> Tx[None]:
    """Queue webhook deliveries of the job's new ``status`` (to one handle, or to all of the job's)."""
    rows = yield from (every(WEBHOOK_HANDLES + " AND h.id = ?", job_id, handle) if handle
                       else every(WEBHOOK_HANDLES, job_id))
    targets = [(handle_view(row[2:]), row[0], row[1]) for row in rows]
    yield from outbox.enqueue(targets, status, status in TERMINAL_STATUSES, now, status_body)


def add_console_link(token_hash: str, identity: ConsoleIdentity, expires_at: str, now: str) -> Tx[None]:
    yield Sql("DELETE FROM console_links WHERE expires_at <= ?", (now,))  # spent or not, an expired link is gone
    yield Sql("INSERT INTO console_links (token_hash, team, user_id, admin, expires_at) VALUES (?, ?, ?, ?, ?)",
              (token_hash, identity.team, identity.user, int(identity.admin), expires_at))


def add_console_session(id_hash: str, identity: ConsoleIdentity, csrf: str, now: str, expires_at: str) -> Tx[None]:
    yield Sql("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
    yield Sql("INSERT INTO console_sessions (id_hash, team, user_id, admin, csrf, created_at, expires_at) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)", (id_hash, identity.team, identity.user, int(identity.admin), csrf, now,
                                               expires_at))


def record_refusal(team: str, user: str, model: str, message: str, now: str) -> Tx[None]:
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
