"""The webhook outbox SQL: deliveries are written in the transaction of the change they report.

A row is one POST to one client endpoint, identified by ``message_id`` (the
``webhook-id`` a receiver deduplicates on). It stays ``pending`` until a
delivery succeeds (``delivered``) or the retry schedule runs out (``failed``,
with the last error), so deliveries survive restarts.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

from ..domain.clock import uuid7
from . import SECRET_PREFIX, Delivery
from .sql import Sql, Tx


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def enqueue(targets: list[tuple[Any, str, str]], status: str, terminal: bool, now: str,
            payload_for: Any) -> Tx[None]:
    """One delivery per (handle view, url, mode): sync handles hear every change, terminal ones only the end."""
    for view, url, mode in targets:
        if mode != "sync" and not terminal:
            continue
        yield Sql(
            "INSERT INTO outbox (message_id, handle, team, url, status, payload, state, next_attempt_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (f"msg_{uuid7().hex}", view.handle, view.team, url, status,
             json.dumps(payload_for(view), separators=(",", ":")), now, now),
        )


def due(now: str, per_team: int, skip: tuple[int, ...] = ()) -> Tx[list[Delivery]]:
    """Deliveries whose time has come, each the oldest pending one of its handle (so a handle hears in order),
    at most ``per_team`` of each team (so one team's backlog cannot hide another's), none of ``skip`` (in flight).
    """
    marks = ", ".join("?" for _ in skip)
    rows = yield Sql(
        "SELECT * FROM (SELECT o.id, o.message_id, o.handle, o.team, o.url, o.status, o.payload, o.attempts, "
        "ROW_NUMBER() OVER (PARTITION BY o.team ORDER BY o.next_attempt_at, o.id) AS place FROM outbox o "
        "WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND o.claimed_until <= ? " +
        (f"AND o.id NOT IN ({marks}) " if skip else "") +
        "AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.handle = o.handle AND e.state = 'pending' AND e.id < o.id)) "
        "AS due WHERE place <= ? ORDER BY place, id",
        (now, now, *skip, per_team),
    )
    return [Delivery(*row[:-1]) for row in rows.fetchall()]


def claim(now: str, per_team: int, skip: tuple[int, ...], claim_until: str) -> Tx[list[Delivery]]:
    """:func:`due`, each row claimed until ``claim_until`` by a conditional update: of processes claiming together,
    each row goes to one (PostgreSQL re-checks the condition on the row a waiting update gets)."""
    found = yield from due(now, per_team, skip)
    if not found:
        return []
    marks = ", ".join("?" for _ in found)
    rows = yield Sql(f"UPDATE outbox SET claimed_until = ? WHERE id IN ({marks}) AND state = 'pending' "
                     "AND claimed_until <= ? RETURNING id", (claim_until, *(d.id for d in found), now))
    claimed = {row[0] for row in rows.fetchall()}
    return [delivery for delivery in found if delivery.id in claimed]
