"""The store's typed records, its own rules for a team's settings, and the errors it raises."""


from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..domain.budget import PERIODS, BudgetView
from ..domain.queueing import MAX_WEIGHT, ON_LIMIT, QueueRules

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
