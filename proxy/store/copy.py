"""``pixazo-proxy db copy``: move a gateway's books from one store to another (SQLite to PostgreSQL, typically).

Every table that holds the books is copied row by row with its ids (teams, jobs, handles, reservations, running
totals, the ledger, idempotency keys, the webhook outbox), in batches of :data:`BATCH` rows per transaction.
What the target derives by itself is not copied: the /metrics rollups are rebuilt by its triggers as the ledger
and jobs arrive, and leases and submit times are per-moment state. The target must be empty (a fresh database:
it is migrated on open); afterwards PostgreSQL's id sequences continue after the copied ids, and the target's
``ledger_mismatches`` is checked. Stop every gateway on the source first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sql import Sql, Tx, changed, every, one
from .sqlstore import SqlStore

BATCH = 1000

#: table -> (columns in order, ordering key); parents before children.
TABLES: dict[str, tuple[str, str]] = {
    "teams": ("name, budget_limit_micros, period, created_at, soft_threshold_percent, user_cap_micros, "
              "max_concurrent_jobs, max_submits_per_minute, updated_at, webhook_secret, weight, on_limit", "name"),
    "jobs": ("id, upstream_id, model, params, status, output, error, created_at, updated_at, completed_at, "
             "checked_at, fingerprint, finished_at, claims_fingerprint, holds_slot, sent_at", "id"),
    "handles": ("id, job_id, team, user_id, model, created_at, cache, webhook_url, webhook_mode", "id"),
    "reservations": ("job_id, handle, team, user_id, model, period_key, global_period_key, amount_micros, seconds, "
                     "resolution, basis, state, created_at, resolved_at, note", "job_id"),
    "budget_totals": ("scope, period_key, spent_micros, reserved_micros, credit_micros, soft_alerted",
                      "scope, period_key"),
    "ledger": ("id, at, kind, team, user_id, handle, job_id, model, seconds, resolution, period_key, global_period_key, "
               "reserved_delta, spent_delta, credit_delta, saved_micros, basis, actor, note", "id"),
    "idempotency_keys": ("team, user_id, idempotency_key, request_hash, handle, expires_at",
                         "team, user_id, idempotency_key"),
    "queued_jobs": ("job_id, handle, team, user_id, model, priority, enqueued_at, deadline", "job_id"),
    "queue_teams": ("team, pass", "team"),
    "outbox": ("id, message_id, handle, team, url, status, payload, state, attempts, next_attempt_at, last_error, "
               "created_at, finished_at", "id"),
}
#: Tables whose ids PostgreSQL generates: their sequences must continue after the copied ids.
IDENTITY_TABLES = ("jobs", "ledger", "outbox")


class TargetNotEmpty(Exception):
    """The target already holds books: copying into it would mix two."""


@dataclass(frozen=True)
class Copied:
    rows: dict[str, int]
    mismatches: list[str]


def _count_all() -> Tx[int]:
    total = 0
    for table in TABLES:
        (count,) = yield from one(f"SELECT COUNT(*) FROM {table}")
        total += int(count)
    return total


def _insert(table: str, columns: str, rows: list[tuple[object, ...]]) -> Tx[None]:
    marks = ", ".join("?" for _ in columns.split(","))
    for row in rows:
        yield Sql(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row))


def _continue_ids() -> Tx[None]:
    for table in IDENTITY_TABLES:
        yield Sql("", postgres_only=True, postgres=f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                                   f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")


async def copy_books(source: SqlStore, target: SqlStore) -> Copied:
    """Copy every book-keeping row of ``source`` into the empty ``target``; the rows copied per table."""
    if await target._read(_count_all):
        raise TargetNotEmpty("the target database already holds teams, jobs or ledger rows; give an empty one")
    copied: dict[str, int] = {}
    for table, (columns, order) in TABLES.items():
        copied[table] = 0
        while True:
            rows = await source._read(every, f"SELECT {columns} FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                                      BATCH, copied[table])
            if not rows:
                break
            await target._write(_insert, table, columns, [tuple(row) for row in rows])
            copied[table] += len(rows)
    await target._write(_continue_ids)
    await target._write(changed, "DELETE FROM leases")
    return Copied(copied, await target.ledger_mismatches())
