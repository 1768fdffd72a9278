"""Transactions written once for every backend: generators that yield statements and receive their rows.

A transaction body is a generator (:data:`Tx`): it yields :class:`Sql` (text
with ``?`` placeholders, as SQLite writes them) and is sent back what the
statement gave (:class:`Rows`: ``fetchone``, ``fetchall``, ``rowcount``). It
does no I/O of its own, so the same body runs on SQLite's writer thread
(:func:`run_sync`, with a ``sqlite3`` cursor as the rows) and on an asyncpg
connection (``postgres.run_async``, with ``$n`` placeholders). Money logic,
dedup and the outbox are therefore one piece of code whatever the backend,
and a second backend cannot drift from the first.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Sql:
    """One statement. ``postgres_only``: a lock SQLite does not need (its single writer already serializes);
    ``postgres``: PostgreSQL's own text for it (``FOR UPDATE SKIP LOCKED``), the same placeholders."""

    text: str
    params: tuple[Any, ...] = ()
    postgres_only: bool = False
    postgres: str | None = None


class Rows(Protocol):
    """What a statement gave back: its rows and how many it changed (or returned)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


#: A transaction body: yields statements, is sent their rows, returns its result.
Tx = Generator[Sql, Rows, T]


class Fetched:
    """Rows already read (what asyncpg gives), behind the :class:`Rows` interface."""

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self._rows = list(rows)
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rest, self._next = self._rows[self._next:], len(self._rows)
        return rest


NOTHING = Fetched([], 0)


def run_sync(db: sqlite3.Connection, tx: Tx[T]) -> T:
    """Run a transaction body on a SQLite connection (the caller owns the transaction around it)."""
    try:
        statement = next(tx)
        while True:
            rows: Rows = NOTHING if statement.postgres_only else db.execute(statement.text, statement.params)
            statement = tx.send(rows)
    except StopIteration as done:
        return done.value


def one(sql: str, *params: Any) -> Tx[Any]:
    """A body of one statement: its first row (None if none)."""
    return (yield Sql(sql, params)).fetchone()


def every(sql: str, *params: Any) -> Tx[list[Any]]:
    """A body of one statement: all its rows."""
    return (yield Sql(sql, params)).fetchall()


def changed(sql: str, *params: Any) -> Tx[int]:
    """A body of one statement: how many rows it changed."""
    return (yield Sql(sql, params)).rowcount


_PLACEHOLDER = re.compile(r"\?")


def numbered(text: str) -> str:
    """``?`` placeholders as ``$1, $2...`` (the store's SQL has no ``?`` inside a literal)."""
    count = 0

    def number(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, text)
