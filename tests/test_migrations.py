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
        assert db.execute("SELECT upstream_id, fingerprint FROM jobs").fetchall() == [("m_1", None)]
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
