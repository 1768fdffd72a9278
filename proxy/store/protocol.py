"""The one interface the gateway talks to the store through (SqlStore implements it for both backends)."""

from __future__ import annotations

from typing import Any, Protocol

from ..domain.budget import BudgetView
from ..domain.queueing import QueueRules
from ..domain.values import Hold
from ..domain.views import HandleView
from .records import (
    Admission,
    ConsoleIdentity,
    ConsoleSession,
    DaySpend,
    Decision,
    Delivery,
    Dispatch,
    HandleQuery,
    HoldCheck,
    JobRow,
    JobUpdate,
    LedgerEntry,
    QueuePlace,
    QueueRow,
    Receipt,
    Refusal,
    RememberedKey,
    Reservation,
    ReusableJob,
    RunningJob,
    Saving,
    SpendRow,
    Submission,
    SubmitWindow,
    Team,
    Totals,
    UserSpend,
)


class Store(Protocol):
    """What the gateway needs from persistence."""

    async def open(self) -> None: ...

    async def close(self, within: float = 5.0) -> None:
        """Close within ``within`` seconds: what is committed stays, what is cut short was never half-written."""
        ...

    async def ping(self) -> bool:
        """True while the store can answer queries (used by ``/readyz``)."""
        ...

    # teams

    async def create_team(self, name: str, budget_limit_micros: int, period: str, **settings: Any) -> Team: ...

    async def update_team(self, name: str, **settings: Any) -> Team: ...

    async def get_team(self, name: str) -> Team | None: ...

    async def list_teams(self) -> list[Team]: ...

    # jobs and handles

    async def begin_submission(self, submission: Submission, hold: Hold | None,
                               admission: Admission | None = None) -> Receipt:
        """Record a handle and its job as SUBMITTING and reserve ``hold``, in one transaction.

        Raises :class:`~proxy.errors.BudgetExceeded` or :class:`~proxy.errors.TooManyRequests`
        (and records nothing) when a cap would be passed.
        """
        ...

    async def mark_submitted(self, job_id: int, upstream_id: str, status: str, *, quiet: bool = False) -> None: ...

    async def take_next(self, rules: QueueRules, now: float) -> Dispatch | float | None: ...

    async def requeue(self, dispatch: Dispatch, pause_until: float | None) -> QueuePlace | None: ...

    async def queue_place(self, job_id: int) -> QueuePlace | None: ...

    async def cancel_waiting(self, handle: str, who: str) -> None: ...

    async def expire_waiting(self, now: float, limit: int = 100) -> list[int]: ...

    async def queue_rows(self, team: str | None = None, limit: int = 100) -> list[QueueRow]: ...

    async def reconcile_gate(self) -> tuple[int, int]: ...

    async def idempotent_handle(self, team: str, user: str, key: str, now: str) -> RememberedKey | None:
        """What an unexpired key remembers; None if unknown or refused upstream."""
        ...

    async def purge_idempotency(self, now: str) -> int:
        """Forget expired keys; how many."""
        ...

    async def find_reusable(self, fingerprint: str, completed_after: str) -> ReusableJob | None:
        """The newest job with ``fingerprint`` that is running, of unknown outcome (see
        :data:`UNKNOWN_OUTCOME`), or COMPLETED after the given time."""
        ...

    async def attach_handle(self, submission: Submission, job_id: int, saving: Saving) -> int:
        """Point a new handle at an existing job, record the saving; the micro-dollars saved."""
        ...

    async def mark_rejected(self, job_id: int, reason: str) -> None:
        """The upstream refused the submit, or provably never got it: hide the job, release its money."""
        ...

    async def mark_indeterminate(self, job_id: int, reason: str) -> None:
        """The submit was sent and its answer lost: keep the job's money held (and its key and fingerprint bound)."""
        ...

    async def get_handle(self, handle: str) -> HandleView | None:
        """The handle as a client may see it; None for unknown or hidden (never accepted) ones."""
        ...

    async def update_job(self, job_id: int, update: JobUpdate, decision: Decision | None = None) -> bool:
        """Apply an upstream observation unless the job is already terminal; True if applied.

        A terminal update ends the job's reservation as ``decision`` says, in the same transaction.
        """
        ...

    async def active_jobs(self, limit: int = 10_000) -> list[RunningJob]:
        """Every job still running upstream, least recently checked first."""
        ...

    async def job_status(self, job_id: int) -> str | None: ...

    async def claim_refresh(self, job_id: int, now: float, interval: float) -> bool:
        """Take the job's lease for one status call (True), unless any process asked about it within ``interval``."""
        ...

    async def claim_running(self, now: float, interval: float, limit: int) -> list[RunningJob]:
        """Lease up to ``limit`` running jobs due a status call (least recently checked first) to this process;
        a process that dies holding some loses them when their lease ends."""
        ...

    async def count_submit(self, team: str, dry_run: bool, now: float, window: float, factor: int) -> SubmitWindow:
        """Count one submit (or dry run: ``factor`` times the limit) against the team's per-minute limit, read in
        this transaction; refused ones are not counted."""
        ...

    async def take_lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Hold the named lease (work one process does at a time) for ``seconds``, unless another holder has it."""
        ...

    async def reservation(self, job_id: int) -> Reservation | None: ...

    async def open_reservations(self, created_before: str) -> list[Reservation]: ...

    # money

    async def budget_view(self, team: str, period_key: str) -> BudgetView: ...

    async def check_hold(self, team: str, user: str, hold: Hold) -> HoldCheck:
        """The team's budget now and why ``hold`` would be refused (None if it would not); reserves nothing."""
        ...

    async def add_entry(self, team: str, kind: str, amount_micros: int, period_key: str, global_period_key: str,
                        actor: str, note: str) -> LedgerEntry:
        """An ``adjust`` (signed change of spend) or ``topup`` (extra allowance for the period)."""
        ...

    async def ledger(self, team: str, period_key: str | None = None, limit: int = 100,
                     before_id: int | None = None, kind: str | None = None,
                     user: str | None = None) -> list[LedgerEntry]: ...

    async def daily_spend(self, team: str, first_day: str, last_day: str) -> list[DaySpend]:
        """The per-day rollup of ``team`` from ``first_day`` to ``last_day`` (inclusive, ``YYYY-MM-DD``)."""
        ...

    async def rebuild_day_rollup(self) -> int:
        """Recompute the per-day rollup from the ledger; the rows it holds."""
        ...

    async def top_users(self, team: str, period_key: str, limit: int = 10) -> list[UserSpend]: ...

    async def global_totals(self, period_key: str) -> Totals:
        """What every team together has spent and holds reserved in a global period."""
        ...

    async def find_handles(self, query: HandleQuery, limit: int = 50) -> list[JobRow]:
        """Handles, newest first, as ``query`` filters them (never a REJECTED or unsent one)."""
        ...

    async def add_console_link(self, token_hash: str, identity: ConsoleIdentity, expires_at: str) -> None: ...

    async def redeem_console_link(self, token_hash: str, now: str) -> ConsoleIdentity | None:
        """The identity of an unused, unexpired link, which is used up by this call; None otherwise."""
        ...

    async def add_console_session(self, id_hash: str, identity: ConsoleIdentity, csrf: str, now: str,
                                  expires_at: str) -> None: ...

    async def console_session(self, id_hash: str, now: str) -> ConsoleSession | None: ...

    async def end_console_session(self, id_hash: str) -> None: ...

    async def record_refusal(self, team: str, user: str, model: str, message: str, now: str) -> None:
        """Remember a budget refusal a team was given (the last :data:`REFUSALS_KEPT` per team are kept)."""
        ...

    async def recent_refusals(self, team: str, limit: int = 10) -> list[Refusal]: ...

    async def spend_report(self, period_keys: dict[str, str]) -> list[SpendRow]:
        """Per team (name -> period key): limit, credit, spent, reserved, jobs, saved."""
        ...

    async def handles_of(self, team: str, limit: int = 100, before: str | None = None) -> list[HandleView]: ...

    async def due_deliveries(self, now: str, per_team: int = 8, skip: tuple[int, ...] = (),
                             claim_until: str | None = None) -> list[Delivery]:
        """Pending webhook deliveries whose time has come: the head of each handle's queue, at most ``per_team``
        per team, none of ``skip``; the teams interleaved, oldest first within each. With ``claim_until`` they are
        claimed for this process until then: no other process is given them meanwhile."""
        ...

    async def release_claims(self, delivery_ids: tuple[int, ...]) -> None:
        """Give back claimed deliveries this process will not start now."""
        ...

    async def delivery_done(self, delivery_id: int, *, delivered: bool, attempts: int, next_attempt_at: str | None,
                            error: str | None) -> None: ...

    async def webhook_secret(self, team: str, *, rotate: bool = False) -> str: ...

    async def metric_figures(self, period_keys: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Figures for /metrics read at scrape time (team -> current period key given)."""
        ...

    async def ledger_mismatches(self) -> list[str]:
        """Every scope and period whose running totals differ from its ledger (empty when sound)."""
        ...
