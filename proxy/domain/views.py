"""The upstream's status shape, as the gateway answers it and as webhooks carry it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .queueing import client_status
from .ttlcache import TtlCache

#: A job is in one of these states. SUBMITTING, INDETERMINATE and REJECTED are
#: the gateway's own: the intent to submit is recorded before the upstream call;
#: a submit that was sent but whose answer was lost (a timeout, a reset, a crash)
#: is INDETERMINATE, its money held until the sweeper resolves it by policy; a
#: submit the upstream refused, or that provably never reached it, is REJECTED.
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "ERROR")


@dataclass(frozen=True)
class HandleView:
    """A client's handle joined with the upstream job it points at."""

    handle: str
    team: str
    user: str
    model: str
    created_at: str
    job_id: int
    upstream_id: str | None
    status: str
    output: dict[str, Any] | None
    error: str | None
    updated_at: str
    completed_at: str | None
    checked_at: float

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def status_body(view: HandleView) -> dict[str, Any]:
    """The upstream's status shape, with the gateway's handle as ``request_id``."""
    return {
        "request_id": view.handle,
        "status": client_status(view.status),
        "model_id": view.model,
        "error": view.error,
        "output": view.output,
        "created_at": view.created_at,
        "updated_at": view.updated_at,
        "completed_at": view.completed_at,
    }


@dataclass(frozen=True)
class TerminalAnswer:
    """A finished job's status answer, encoded once, with what the status route checks and logs."""

    team: str
    model: str
    body: bytes


class TerminalAnswers:
    """Encoded status answers of finished jobs, so polling one costs neither a store read nor an encode.

    A terminal job's row never changes again (the store's updates skip terminal rows and nothing deletes
    handles), so an entry cannot go stale; entries still expire after ``ttl_seconds`` so a row repaired by
    hand shows within that, and at most ``max_entries`` are kept.
    """

    def __init__(self, max_entries: int = 20_000, ttl_seconds: float = 300.0) -> None:
        self._answers: TtlCache[str, TerminalAnswer] = TtlCache(ttl_seconds, max_entries)

    def get(self, handle: str) -> TerminalAnswer | None:
        return self._answers.get(handle)

    def remember(self, view: HandleView) -> TerminalAnswer:
        """The answer for ``view``, which must be terminal, kept for the next poll."""
        if not view.terminal:
            raise ValueError(f"{view.handle} is {view.status}, not terminal")
        answer = TerminalAnswer(view.team, view.model, json.dumps(status_body(view)).encode())
        self._answers.put(view.handle, answer)
        return answer
