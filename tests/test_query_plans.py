"""Every statement the hot paths run uses an index: no SCAN of a table that grows with traffic.

The statements are not copied here: the store's own connections are traced while a submit, a cache hit, an
idempotent replay, polls, a settlement, the tracker's listing, webhook deliveries and the sweeper's purge run
through the store, and each traced statement is then explained as SQLite would run it.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from proxy.store import Decision, IdempotencyRecord, JobUpdate, Saving, Submission
from proxy.store.sqlite import SQLiteStore
from proxy.values import Estimate, Hold

GROWING_TABLES = ("ledger", "jobs", "handles", "reservations", "idempotency_keys", "outbox", "submit_times")
SCAN = re.compile(r"\bSCAN (" + "|".join(GROWING_TABLES) + r")\b")
#: Partial indexes that hold only work in flight (their size is what is running, not the history): reading one
#: whole is the point of it.
IN_FLIGHT_INDEXES = ("jobs_running",)


class TracedStore(SQLiteStore):
    """The real store, its connections tracing every statement they run."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, checkpoint_seconds=3600)
        self.statements: list[str] = []

    def _connect(self) -> sqlite3.Connection:
        connection = super()._connect()
        connection.set_trace_callback(self.statements.append)
        return connection


async def hot_paths(store: TracedStore) -> None:
    await store.create_team("design", 50_000_000, "month")
    hold = Hold(Estimate(420_000, 6, "720p", "params", True), "2026-11", "2026-11", 1_000_000_000)
    key = IdempotencyRecord("k1", "hash", "2999-01-01T00:00:00.000000Z")
    first = Submission("h1", "design", "alice", "m", '{"prompt":"p"}', fingerprint="fp", webhook_url="https://x.example/h",
                       webhook_mode="sync", idempotency=key)
    receipt = await store.begin_submission(first, hold)
    await store.mark_submitted(receipt.job_id, "m_1", "QUEUED")
    await store.idempotent_handle("design", "alice", "k1", "2026-11-25T00:00:00.000000Z")
    await store.find_reusable("fp", "2026-11-24T00:00:00.000000Z")
    await store.get_handle("h1")
    await store.active_jobs()
    await store.update_job(receipt.job_id, JobUpdate("PROCESSING", None, None, "t", None, 1.0))
    twin = Submission("h2", "design", "bob", "m", '{"prompt":"p"}', fingerprint="fp", cache="COALESCED",
                      webhook_url="https://x.example/h", webhook_mode="sync")
    await store.attach_handle(twin, receipt.job_id, Saving("2026-11", "2026-11"))
    await store.reservation(receipt.job_id)
    await store.update_job(receipt.job_id, JobUpdate("COMPLETED", {"media_url": ["u"]}, None, "t", "t", 2.0),
                           Decision("settle", 420_000, 6, "720p", "params", "COMPLETED"))
    hit = Submission("h3", "design", "carol", "m", '{"prompt":"p"}', fingerprint="fp", cache="HIT",
                     webhook_url="https://x.example/h", webhook_mode="terminal")
    await store.attach_handle(hit, receipt.job_id, Saving("2026-11", "2026-11"))
    for delivery in await store.due_deliveries("2999-01-01T00:00:00.000000Z"):
        await store.delivery_done(delivery.id, delivered=True, attempts=1, next_attempt_at=None, error=None)
    await store.open_reservations("2999-01-01T00:00:00.000000Z")
    await store.purge_idempotency("2026-11-25T00:00:00.000000Z")
    await store.budget_view("design", "2026-11")
    await store.check_hold("design", "alice", hold)
    await store.metric_figures({"design": "2026-11"})  # every /metrics scrape
    # what several processes coordinate through
    await store.claim_refresh(receipt.job_id, 10.0, 1.0)
    await store.claim_running(10.0, 1.0, 100)
    await store.update_team("design", max_submits_per_minute=5)
    await store.count_submit("design", False, 10.0, 60.0, 10)
    await store.take_lease("sweeper", "me", 10.0, 60.0)
    await store.due_deliveries("2999-01-01T00:00:00.000000Z", claim_until="2999-01-01T00:01:00.000000Z")
    await store.job_status(receipt.job_id)


async def test_hot_path_statements_use_indexes(tmp_path: Path) -> None:
    store = TracedStore(tmp_path / "plans.db")
    await store.open()
    try:
        store.statements.clear()  # what opening and migrating ran does not count
        await hot_paths(store)
    finally:
        await store.close()

    explained: dict[str, list[str]] = {}
    with sqlite3.connect(tmp_path / "plans.db") as db:
        for statement in dict.fromkeys(store.statements):
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", statement, re.IGNORECASE):
                continue
            explained[statement] = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]

    assert len(explained) >= 20, "the workload ran too few statements to mean anything"
    scans = {statement: [line for line in plan if SCAN.search(line) and not line.endswith(IN_FLIGHT_INDEXES)]
             for statement, plan in explained.items()}
    assert {statement: lines for statement, lines in scans.items() if lines} == {}
