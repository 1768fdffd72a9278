"""Persistence: one interface, with SQLite (stdlib sqlite3 on threads of its own) as the embedded implementation.

The gateway talks only to :class:`Store`. SQL is kept portable (conditional
updates rather than locks, ``ON CONFLICT DO NOTHING``, no SQLite-only types)
so a PostgreSQL backend can be added behind the same interface.

Money invariants the store keeps, because totals and ledger rows change in
one transaction: for every scope and period, ``spent = sum(spent_delta)``,
``reserved = sum(reserved_delta)`` and ``credit = sum(credit_delta)`` over the
ledger; every reservation ends in exactly one settle or release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..queueing import MAX_WEIGHT, ON_LIMIT, QueueRules
from ..values import Hold

PERIODS = ("month", "week", "day", "total")

#: A job is in one of these states. SUBMITTING, INDETERMINATE and REJECTED are
#: the gateway's own: the intent to submit is recorded before the upstream call;
#: a submit that was sent but whose answer was lost (a timeout, a reset, a crash)
#: is INDETERMINATE, its money held until the sweeper resolves it by policy; a
#: submit the upstream refused, or that provably never reached it, is REJECTED.
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "ERROR")
#: WAITING (proxy.queueing): a job in the gateway's own queue, its money reserved, not yet sent (clients see QUEUED).
#: Every kind of ledger entry (the ledger's CHECK constraint).
LEDGER_KINDS = ("reserve", "settle", "release", "adjust", "topup", "saving")
#: Budget refusals remembered per team (the console shows the newest).
REFUSALS_KEPT = 20
#: Jobs whose upstream outcome the gateway does not know (yet): never resubmitted while so.
UNKNOWN_OUTCOME = ("SUBMITTING", "INDETERMINATE")

TEAM_SETTINGS = ("budget_limit_micros", "period", "soft_threshold_percent", "user_cap_micros",
                 "max_concurrent_jobs", "max_submits_per_minute", "weight", "on_limit")



#: What a team may be called, wherever it is created: no '/' (it separates team and user in scope keys), no
#: spaces, nothing a spreadsheet reads as a formula. Matched whole (``fullmatch``): "design\n" is not "design".
TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TEAM_NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def team_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a team, or None."""
    if not isinstance(name, str) or not TEAM_NAME.fullmatch(name):
        return f"a team name must be {TEAM_NAME_RULE}"
    return None


class SettingProblem(ValueError):
    """A team setting breaks its rule: ``setting`` is the store's name, ``rule`` what it must be."""

    def __init__(self, setting: str, rule: str) -> None:
        super().__init__(f"{setting} {rule}")
        self.setting = setting
        self.rule = rule


#: setting -> (least value, greatest value or None); None values clear the optional ones.
_SETTING_RANGES: dict[str, tuple[int, int | None]] = {
    "budget_limit_micros": (0, None),
    "soft_threshold_percent": (1, 100),
    "user_cap_micros": (0, None),
    "max_concurrent_jobs": (1, None),
    "max_submits_per_minute": (1, None),
    "weight": (1, MAX_WEIGHT),
}
_OPTIONAL_SETTINGS = ("user_cap_micros", "max_concurrent_jobs", "max_submits_per_minute")


def check_team_settings(settings: dict[str, Any]) -> None:
    """The one check of team settings, whoever changes them (admin API, CLI, store): :class:`SettingProblem`."""
    for name, value in settings.items():
        if name not in TEAM_SETTINGS:
            raise SettingProblem(name, "is not a team setting")
        if name == "period":
            if value not in PERIODS:
                raise SettingProblem(name, "must be one of " + ", ".join(PERIODS))
            continue
        if name == "on_limit":
            if value not in ON_LIMIT:
                raise SettingProblem(name, "must be one of " + ", ".join(ON_LIMIT))
            continue
        if value is None:
            if name not in _OPTIONAL_SETTINGS:
                raise SettingProblem(name, "cannot be cleared")
            continue
        least, most = _SETTING_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
            span = f"between {least} and {most}" if most is not None else f"of at least {least}"
            raise SettingProblem(name, f"must be a whole number {span}")


class StoreError(Exception):
    """Base of errors the store raises on purpose."""


class TeamExists(StoreError):
    pass


class UnknownTeam(StoreError):
    pass


class FingerprintTaken(StoreError):
    """An identical request (its fingerprint) is already being submitted or running, possibly on another process:
    the new one should join job ``job_id`` rather than send a second upstream submit."""

    def __init__(self, job_id: int, status: str) -> None:
        super().__init__(f"job {job_id} ({status}) holds this fingerprint")
        self.job_id = job_id
        self.status = status


class EntryRefused(StoreError):
    """A manual ledger entry that would break a rule (a refund larger than what was spent)."""


@dataclass(frozen=True)
class Team:
    name: str
    budget_limit_micros: int
    period: str
    created_at: str
    soft_threshold_percent: int = 80
    user_cap_micros: int | None = None
    max_concurrent_jobs: int | None = None
    max_submits_per_minute: int | None = None
    updated_at: str | None = None
    weight: int = 1
    on_limit: str = "queue"


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


@dataclass(frozen=True)
class Decision:
    """How a reservation ends: settled for ``charge_micros``, or released (``charge_micros`` 0)."""

    kind: str  # "settle" | "release"
    charge_micros: int
    seconds: int
    resolution: str
    basis: str
    note: str

    @classmethod
    def release(cls, note: str, seconds: int = 0, resolution: str = "", basis: str = "released") -> Decision:
        return cls("release", 0, seconds, resolution, basis, note)


@dataclass(frozen=True)
class Reservation:
    job_id: int
    handle: str
    team: str
    user: str
    model: str
    period_key: str
    amount_micros: int
    seconds: int
    resolution: str
    basis: str
    state: str
    created_at: str
    params: dict[str, Any]
    job_status: str
    upstream_id: str | None
    since: str = ""  # when its job was last sent upstream (its reservation's creation if it never waited)


@dataclass(frozen=True)
class BudgetView:
    team: str
    period_key: str
    limit_micros: int
    credit_micros: int
    spent_micros: int
    reserved_micros: int

    @property
    def remaining_micros(self) -> int:
        """What is left; negative when a job cost more than was reserved for it (an overrun), never clamped."""
        return self.limit_micros + self.credit_micros - self.spent_micros - self.reserved_micros


@dataclass(frozen=True)
class SoftAlert:
    team: str
    period_key: str
    threshold_percent: int
    used_micros: int
    limit_micros: int


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    request_hash: str
    expires_at: str


@dataclass(frozen=True)
class RememberedKey:
    """An unexpired Idempotency-Key: the hash of the request it came with, its handle, and its job's status."""

    request_hash: str
    handle: str
    status: str


@dataclass(frozen=True)
class ReusableJob:
    """A job an identical request may share (running, of unknown outcome, or COMPLETED within the TTL)."""

    job_id: int
    status: str


@dataclass(frozen=True)
class RunningJob:
    """A job running upstream, for the tracker."""

    job_id: int
    upstream_id: str
    checked_at: float


@dataclass(frozen=True)
class SubmitWindow:
    """A team's submits in the last minute, counted across every process: admitted, or when to retry."""

    limit: int | None
    used: int
    retry_after: float | None  # None: this submit was admitted (and counted)


@dataclass(frozen=True)
class HoldCheck:
    """A dry run's answer: the team's budget now, and why the hold would be refused (None: it would not)."""

    budget: BudgetView
    refusal: str | None


@dataclass(frozen=True)
class SpendRow:
    """One team's spend for one period, as reports show it."""

    team: str
    period: str
    limit_micros: int
    credit_micros: int
    spent_micros: int
    reserved_micros: int
    remaining_micros: int
    charged_jobs: int
    saved_micros: int


#: A webhook signing secret's prefix (Standard Webhooks).
SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Delivery:
    """One webhook POST waiting in the outbox; ``message_id`` is the ``webhook-id`` receivers deduplicate on."""

    id: int
    message_id: str
    handle: str
    team: str
    url: str
    status: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class Submission:
    """A new handle, as the pipeline asks the store to record it."""

    handle: str
    team: str
    user: str
    model: str
    params_json: str
    fingerprint: str | None = None
    cache: str = "MISS"
    webhook_url: str | None = None
    webhook_mode: str | None = None
    idempotency: IdempotencyRecord | None = None


@dataclass(frozen=True)
class Saving:
    """A handle answered from an existing job: nothing charged, the job's cost saved."""

    period_key: str
    global_period_key: str


@dataclass(frozen=True)
class Receipt:
    """What recording a submission did to the money."""

    job_id: int
    budget: BudgetView | None = None
    alert: SoftAlert | None = None
    queued: QueuePlace | None = None  # it waits in the local queue (not sent); None: the caller sends it now


@dataclass(frozen=True)
class QueuePlace:
    """Where a locally queued job stands: its place in its team's queue (1: next) and how long it has waited."""

    position: int
    waited_seconds: float


@dataclass(frozen=True)
class Admission:
    """What decides whether a new submit is sent now or waits: the account's limits, and its team priority."""

    rules: QueueRules
    priority: int
    now: float  # wall-clock seconds


@dataclass(frozen=True)
class Dispatch:
    """A waiting job the dispatcher has taken from the queue (now SUBMITTING, its slot held): send it."""

    job_id: int
    handle: str
    team: str
    user: str
    model: str
    params: dict[str, Any]
    enqueued_at: float
    deadline: float
    priority: int
    stride: int  # what taking it added to its team's pass (given back if it goes back to waiting)


@dataclass(frozen=True)
class QueueRow:
    """One waiting job, for the console and the metrics."""

    handle: str
    team: str
    user: str
    model: str
    priority: int
    enqueued_at: float


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    at: str
    kind: str
    team: str
    user: str | None
    handle: str | None
    model: str | None
    seconds: int | None
    resolution: str | None
    period_key: str
    reserved_delta: int
    spent_delta: int
    credit_delta: int
    saved_micros: int
    basis: str | None
    actor: str | None
    note: str | None


@dataclass(frozen=True)
class DaySpend:
    """One line of the per-day rollup: a team's settled jobs, charges and cache savings on one UTC day."""

    day: str
    period_key: str
    model: str  # '' for entries that name none (adjustments)
    resolution: str
    jobs: int
    seconds: int
    charged_micros: int
    hits: int
    saved_micros: int


@dataclass(frozen=True)
class Totals:
    spent_micros: int
    reserved_micros: int


@dataclass(frozen=True)
class UserSpend:
    user: str
    spent_micros: int
    reserved_micros: int


@dataclass(frozen=True)
class HandleQuery:
    """Which handles a listing shows (every field optional; ``before`` pages on (created_at, handle))."""

    team: str | None = None
    user: str | None = None
    model: str | None = None
    status: str | None = None
    cache: str | None = None
    since: str | None = None  # created_at >= (an ISO date or time)
    until: str | None = None  # created_at < (an ISO date or time)
    before: tuple[str, str] | None = None


@dataclass(frozen=True)
class JobRow:
    """A handle as the console lists it: what was asked, what was reserved and charged, and how it ended."""

    handle: str
    team: str
    user: str
    model: str
    created_at: str
    cache: str
    status: str
    params: dict[str, Any]
    output: dict[str, Any] | None
    error: str | None
    updated_at: str
    completed_at: str | None
    estimate_micros: int | None  # the reservation this handle made (None: it made none, e.g. a cache hit)
    charged_micros: int | None  # what its settlement charged (None: not settled yet, or it made no reservation)
    basis: str | None  # the settlement's (or the saving's) ledger basis
    saved_micros: int | None


@dataclass(frozen=True)
class ConsoleIdentity:
    team: str
    user: str
    admin: bool


@dataclass(frozen=True)
class ConsoleSession:
    identity: ConsoleIdentity
    csrf: str
    expires_at: str


@dataclass(frozen=True)
class Refusal:
    at: str
    user: str
    model: str
    message: str


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
