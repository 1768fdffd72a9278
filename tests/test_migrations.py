"""Schema migrations: a database from the first release upgrades in place; a newer one is refused, untouched."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.store.migrations import MIGRATIONS
from proxy.store.sqlite import SQLiteStore, _statements


def first_release_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        for statement in _statements(MIGRATIONS[0]):
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO teams (name, budget_limit_micros, period, created_at) "
                   "VALUES ('design', 25000000, 'month', '2026-01-01T00:00:00.000000Z')")
        db.execute("INSERT INTO jobs (upstream_id, model, params, status, created_at, updated_at) "
                   "VALUES ('m_1', 'm', '{}', 'COMPLETED', 't', 't')")
        db.execute("INSERT INTO jobs (upstream_id, model, params, status, created_at, updated_at) "
                   "VALUES ('m_2', 'm', '{}', 'PROCESSING', 't', 't')")


async def test_a_first_release_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    first_release_database(path)
    store = SQLiteStore(path)

    await store.open()
    try:
        team = await store.get_team("design")
        await store.create_team("new", 1_000_000, "week")
    finally:
        await store.close()

    assert team is not None and (team.budget_limit_micros, team.period, team.soft_threshold_percent) == (
        25_000_000, "month", 80)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("SELECT upstream_id, fingerprint FROM jobs").fetchall() == [("m_1", None), ("m_2", None)]
        assert db.execute("SELECT model, status, jobs FROM job_counts ORDER BY status").fetchall() == [
            ("m", "COMPLETED", 1), ("m", "PROCESSING", 1)]
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ledger_job", "jobs_running", "outbox_handle_order"} <= indexes


async def test_a_database_from_a_newer_gateway_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    first_release_database(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SQLiteStore(path)

    with pytest.raises(RuntimeError, match=f"schema version {len(MIGRATIONS) + 1}, newer than this gateway's"):
        await store.open()
    await store.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
        assert [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE name = 'ledger'")] == []


async def test_the_metrics_rollups_start_from_the_history_they_summarise(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    with sqlite3.connect(path) as db:
        for number, script in enumerate(MIGRATIONS[:5], start=1):
            for statement in _statements(script):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        for kind, spent, saved, model in (("reserve", 0, 0, "m"), ("settle", 420_000, 0, "m"), ("saving", 0, 420_000, "m"),
                                          ("settle", 70_000, 0, "n"), ("topup", 0, 0, None)):
            db.execute("INSERT INTO ledger (at, kind, team, model, period_key, global_period_key, spent_delta, "
                       "saved_micros) VALUES ('t', ?, 'design', ?, '2026-01', '2026-01', ?, ?)", (kind, model, spent, saved))
    store = SQLiteStore(path)
    await store.open()
    try:
        figures = await store.metric_figures({})
    finally:
        await store.close()

    assert figures["pixazo_proxy_spent_usd"] == [({"team": "design", "model": "m"}, 0.42),
                                                 ({"team": "design", "model": "n"}, 0.07)]
    assert figures["pixazo_proxy_cache_saved_usd"] == [({"team": "design"}, 0.42)]
