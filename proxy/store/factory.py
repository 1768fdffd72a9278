"""The one place a store backend is chosen, from the configured location (``PROXY_DB`` / ``--db``)."""

from __future__ import annotations

from pathlib import Path

from . import Store
from .sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgres://", "postgresql://")


def location_problem(location: str) -> str | None:
    """Why no store can be opened at ``location``, or None."""
    if location.startswith(POSTGRES_SCHEMES):
        return "PostgreSQL URLs are not supported yet: give a SQLite database path"
    if "://" in location:
        return "must be a SQLite database path"
    return None


def store_at(location: str | Path) -> Store:
    """The store at ``location``: a SQLite database path (``:memory:`` for tools and tests)."""
    problem = location_problem(str(location))
    if problem is not None:
        raise ValueError(f"{location}: {problem}")
    return SQLiteStore(location)
