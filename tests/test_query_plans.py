"""Every statement the hot paths run uses an index: no SCAN of a table that grows with traffic.

The statements are not copied here: the store's own connections are traced while a submit, a cache hit, an
idempotent replay, polls, a settlement, the tracker's listing, webhook deliveries and the sweeper's purge run
through the store, and each traced statement is then explained as SQLite would run it.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from proxy.domain.values import Estimate, Hold
from proxy.store import ConsoleIdentity, Decision, HandleQuery, IdempotencyRecord, JobUpdate, Saving, Submission
from proxy.store.sqlite import SQLiteStore

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


#: sqlite_stat1 of a gateway holding a million finished jobs of one team (tests/bench/console.py's store): the
#: planner's choices at that size, which a small test database would not show.
MILLION_ROW_STATS = [
    ("day_rollup", "day_rollup_period", "29 29 15"), ("day_rollup", "sqlite_autoindex_day_rollup_1", "29 29 1 1 1 1"),
    ("teams", "sqlite_autoindex_teams_1", "20 1"), ("jobs", "jobs_fingerprint", "1000000 1 1"),
    ("jobs", "sqlite_autoindex_jobs_1", "1000000 1"), ("handles", "handles_created", "1000000 1 1"),
    ("handles", "handles_job", "1000000 1"), ("handles", "handles_team", "1000000 1000000 1"),
    ("handles", "sqlite_autoindex_handles_1", "1000000 1"), ("budget_totals", "sqlite_autoindex_budget_totals_1", "55 1 1"),
    ("ledger", "ledger_job", "1000000 1"), ("ledger", "ledger_team_period", "1000000 1000000 500000 1"),
    *(("ledger", f"ledger_{kind}", "100 100 50 1") for kind in ("release", "saving", "adjust", "topup")),
    ("reservations", None, "1000000"), ("refusals", "refusals_team", "20 20 1"),
]


async def console_paths(store: TracedStore) -> None:
    """What the console's pages read and write (after the hot paths, so every table has rows)."""
    await store.spend_report({"design": "2026-11"})
    await store.daily_spend("design", "2026-10-01", "2026-11-30")
    await store.top_users("design", "2026-11")
    await store.global_totals("2026-11")
    await store.find_handles(HandleQuery(), 51)
    await store.find_handles(HandleQuery(status="COMPLETED"), 51)  # the gallery of every team
    await store.find_handles(HandleQuery(model="m", cache="HIT", status="COMPLETED"), 51)
    await store.find_handles(HandleQuery(team="design", status="COMPLETED", before=("2026-11-30", "h9")), 51)
    await store.find_handles(HandleQuery(team="design", user="alice", since="2026-11-01", until="2026-12-01"), 51)
    await store.ledger("design", "2026-11", 51, 100, "topup", "alice")
    await store.ledger("design", "2026-11", 51, None, "adjust")  # a kind a long period may hold none of
    identity = ConsoleIdentity("design", "alice", True)
    await store.add_console_link("link", identity, "2999-01-01T00:00:00.000Z")
    await store.redeem_console_link("link", "2026-11-25T00:00:00.000Z")
    await store.add_console_session("session", identity, "csrf", "2026-11-25T00:00:00.000Z", "2999-01-01T00:00:00.000Z")
    await store.console_session("session", "2026-11-25T00:00:00.000Z")
    await store.end_console_session("session")
    await store.record_refusal("design", "alice", "m", "over budget", "2026-11-25T00:00:00.000Z")
    await store.recent_refusals("design")


async def test_console_statements_read_through_indexes(tmp_path: Path) -> None:
    """No page reads a growing table whole, under any alias: every table is searched by an index or walked in
    an index's order under a LIMIT, and nothing that grows is sorted in a temporary tree."""
    store = TracedStore(tmp_path / "console.db")
    await store.open()
    try:
        await hot_paths(store)
        store.statements.clear()
        await console_paths(store)
    finally:
        await store.close()
    found: dict[str, list[str]] = {}
    with sqlite3.connect(tmp_path / "console.db") as db:  # planned as for a gateway with a million jobs
        db.execute("ANALYZE")
        db.execute("DELETE FROM sqlite_stat1")
        db.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", MILLION_ROW_STATS)
        db.commit()
    with sqlite3.connect(tmp_path / "console.db") as db:
        for statement in dict.fromkeys(store.statements):
            if re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", statement, re.IGNORECASE):
                found[statement] = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
    assert len(found) >= 15
    bad = {statement: [line for line in plan if re.match(r"SCAN \w+$", line)  # a table read whole, no index
                       or line == "USE TEMP B-TREE FOR ORDER BY"]  # everything found sorted (a growing set)
           # teams: a row per team; budget_totals: a row per user and period of one team, not per job
           for statement, plan in found.items() if "FROM teams" not in statement and "FROM budget_totals" not in statement}
    assert {statement: lines for statement, lines in bad.items() if lines} == {}
    # a listing of a kind a period holds few of reads that kind's own index, not the period's every row
    [adjustments] = [plan for statement, plan in found.items() if "kind = 'adjust'" in statement]
    assert any("USING INDEX ledger_adjust " in line for line in adjustments), adjustments
