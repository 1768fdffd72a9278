"""Persistence: one interface, with SQLite (aiosqlite) as the embedded implementation.

The gateway talks only to :class:`Store`. SQL is kept portable (no SQLite-only
upserts or types in the schema's meaning) so a PostgreSQL backend can be added
behind the same interface for several replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

PERIODS = ("month", "week", "day", "total")

#: A job is in one of these states. SUBMITTING and REJECTED are the gateway's
#: own: the intent to submit is recorded before the upstream call, and a
#: submit the upstream refused (or that may not have reached it) is REJECTED.
ACTIVE_STATUSES = ("QUEUED", "PROCESSING")
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "ERROR")
HIDDEN_STATUSES = ("SUBMITTING", "REJECTED")


class StoreError(Exception):
    """Base of errors the store raises on purpose."""


class TeamExists(StoreError):
    pass


class UnknownTeam(StoreError):
    pass


@dataclass(frozen=True)
class Team:
    name: str
    budget_limit_micros: int
    period: str
    created_at: str


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


@dataclass(frozen=True)
class JobUpdate:
    """What the upstream said about a job at one moment."""

    status: str
    output: dict[str, Any] | None
    error: str | None
    updated_at: str
    completed_at: str | None
    checked_at: float


class Store(Protocol):
    """What the gateway needs from persistence."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True while the store can answer queries (used by ``/readyz``)."""
        ...

    async def create_team(self, name: str, budget_limit_micros: int, period: str) -> Team: ...

    async def get_team(self, name: str) -> Team | None: ...

    async def list_teams(self) -> list[Team]: ...

    async def begin_submission(self, handle: str, team: str, user: str, model: str, params_json: str) -> int:
        """Record a handle and its job as SUBMITTING before calling upstream; return the job id."""
        ...

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str) -> None: ...

    async def mark_rejected(self, job_id: int, reason: str) -> None: ...

    async def get_handle(self, handle: str) -> HandleView | None:
        """The handle as a client may see it; None for unknown or hidden (never accepted) ones."""
        ...

    async def update_job(self, job_id: int, update: JobUpdate) -> bool:
        """Apply an upstream observation unless the job is already terminal; True if applied."""
        ...
