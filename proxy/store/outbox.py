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
from dataclasses import dataclass
from typing import Any

import aiosqlite

from ..clock import uuid7

SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Delivery:
    id: int
    message_id: str
    handle: str
    team: str
    url: str
    status: str
    payload: str
    attempts: int


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


async def enqueue(db: aiosqlite.Connection, handle_rows: list[tuple[Any, ...]], status: str, terminal: bool,
                  now: str, payload_for: Any) -> int:
    """One delivery per handle that asked for it: sync handles hear every change, terminal ones only the end."""
    count = 0
    for row in handle_rows:
        view, team, url, mode = row
        if mode != "sync" and not terminal:
            continue
        await db.execute(
            "INSERT INTO outbox (message_id, handle, team, url, status, payload, state, next_attempt_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (f"msg_{uuid7().hex}", view.handle, team, url, status,
             json.dumps(payload_for(view), separators=(",", ":")), now, now),
        )
        count += 1
    return count


async def due(db: aiosqlite.Connection, now: str, limit: int) -> list[Delivery]:
    async with db.execute(
        "SELECT id, message_id, handle, team, url, status, payload, attempts FROM outbox "
        "WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
        (now, limit),
    ) as cursor:
        return [Delivery(*row) async for row in cursor]
