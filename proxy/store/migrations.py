"""Versioned schema migrations. Entry ``n`` (1-based) takes the schema from version n-1 to n.

Append only: a released migration is never edited, a change is a new entry.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: teams, upstream jobs, client handles
    """
    CREATE TABLE teams (
        name TEXT PRIMARY KEY,
        budget_limit_micros INTEGER NOT NULL CHECK (budget_limit_micros >= 0),
        period TEXT NOT NULL CHECK (period IN ('month', 'week', 'day', 'total')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        upstream_id TEXT UNIQUE,
        model TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        completed_at TEXT,
        checked_at REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_unfinished ON jobs (status)
        WHERE status IN ('SUBMITTING', 'QUEUED', 'PROCESSING');
    CREATE TABLE handles (
        id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        team TEXT NOT NULL REFERENCES teams (name),
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX handles_team ON handles (team, created_at);
    CREATE INDEX handles_job ON handles (job_id);
    """,
]
