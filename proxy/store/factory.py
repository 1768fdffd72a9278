"""The one place a store backend is chosen, from the configured location (``PROXY_DB`` / ``--db``).

A SQLite database path (the embedded default), or a ``postgresql://user@host:port/db`` URL for several gateway
processes and replicas sharing one set of books.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from . import Store
from .sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgres://", "postgresql://")
#: Connections each gateway process keeps to PostgreSQL at most (``PROXY_DB_POOL_SIZE``).
DEFAULT_POOL_SIZE = 10


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(POSTGRES_SCHEMES)


def location_problem(location: str) -> str | None:
    """Why no store can be opened at ``location``, or None."""
    if is_postgres(location):
        try:
            parts = urlsplit(location)
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError as error:
            return f"is not a valid PostgreSQL URL: {error}"
        if not parts.hostname and "host=" not in parts.query:
            return "is a PostgreSQL URL without a host (postgresql://user@host:port/database)"
        return None
    if "://" in location:
        return "must be a SQLite database path or a postgresql:// URL"
    return None


def pool_size_problem(value: str) -> str | None:
    if not value.strip().isdigit() or not 1 <= int(value) <= 1000:
        return "must be a whole number from 1 to 1000"
    return None


def store_at(location: str | Path, *, pool_size: int | None = None) -> Store:
    """The store at ``location``: a SQLite database path (``:memory:`` for tools and tests) or a PostgreSQL URL.

    ``pool_size`` defaults to ``PROXY_DB_POOL_SIZE`` (else :data:`DEFAULT_POOL_SIZE`); SQLite ignores it.
    """
    problem = location_problem(str(location))
    if problem is not None:
        raise ValueError(f"{shown(str(location))}: {problem}")
    if is_postgres(location):
        from .postgres import PostgresStore  # asyncpg is imported only by deployments that use it

        if pool_size is None:
            raw = os.environ.get("PROXY_DB_POOL_SIZE", str(DEFAULT_POOL_SIZE))
            if (size_problem := pool_size_problem(raw)) is not None:
                raise ValueError(f"PROXY_DB_POOL_SIZE {size_problem}")
            pool_size = int(raw)
        return PostgresStore(str(location), pool_size=pool_size)
    return SQLiteStore(location)


def shown(location: str) -> str:
    """A location as it may be printed: a PostgreSQL URL without its password."""
    if not is_postgres(location):
        return location
    try:
        parts = urlsplit(location)
        if parts.password:
            return location.replace(f":{parts.password}@", ":***@", 1)
    except ValueError:
        pass
    return location
