"""Sharing one upstream key: the account's limits, and the fair order in which waiting jobs are sent.

The upstream account has limits of its own (jobs running at once, submits per
second). ``policies/upstream.toml`` names them; a submit that finds no room
(or whose team is at its own ``max_concurrent_jobs``) waits in the store's
local queue instead of being refused, its money already reserved, and the
dispatcher sends waiting jobs as room frees.

The order is *stride scheduling*, a deterministic form of weighted fair
queuing: every team has a *pass*; sending one of its jobs adds
``STRIDE // weight`` to it; the next job sent is the head of the waiting team
with the lowest pass (FIFO within a team, higher ``X-Proxy-Priority`` first).
A team that starts waiting starts at the pass of the last job sent, so an idle
team cannot save up turns, and a team that floods only lengthens its own
queue. The bound (stated in the README): with teams of weights ``w_i`` waiting
together, once team B's job is at place ``k`` of B's queue, at most
``sum over other waiting teams i of (ceil(k * w_i / w_B) + 1)`` jobs of other
teams are sent before it.

This module is domain logic only: no HTTP, no store.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
from dataclasses import dataclass
from pathlib import Path

from .policyfile import read_toml

UPSTREAM_FILE = "upstream.toml"
#: A team's pass grows by STRIDE // weight per job sent (integers: exact, and the same on every backend).
STRIDE = 1_000_000
MAX_WEIGHT = 1000
ON_LIMIT = ("queue", "refuse")
#: X-Proxy-Priority: a team's own order among its waiting jobs (higher first), default 0.
PRIORITY_HEADER = "X-Proxy-Priority"
PRIORITY_RANGE = (-100, 100)
#: Where a waiting job stands, on its 202 and its status polls: its place in its team's queue, and its wait so far.
QUEUE_POSITION_HEADER = "X-Proxy-Queue-Position"
QUEUE_WAIT_HEADER = "X-Proxy-Queue-Wait-Seconds"
#: The handle status of a locally queued job, as the client sees it (the upstream's own word).
CLIENT_STATUS = "QUEUED"
#: The store's status of a job waiting in the local queue (never sent upstream yet).
WAITING = "WAITING"
#: The gateway's own statuses a client whose submit was answered 202 QUEUED may see, as it sees them.
_CLIENT_STATUSES = {WAITING: CLIENT_STATUS, "SUBMITTING": CLIENT_STATUS, "INDETERMINATE": CLIENT_STATUS}


def client_status(status: str) -> str:
    """A job's status in the upstream's words: a job waiting, being sent or of unknown outcome is QUEUED."""
    return _CLIENT_STATUSES.get(status, status)


@dataclass(frozen=True)
class QueueRules:
    """``policies/upstream.toml``: the account's limits and the local queue's bounds."""

    max_in_flight: int | None = None  # jobs sent upstream and not yet ended, across every process; None: no limit
    submits_per_second: float | None = None  # None: no limit
    submit_burst: int = 1  # submits that may go back to back before the rate applies
    throttle_seconds: float = 5.0  # how long a 429 without Retry-After pauses submits
    max_queued: int = 10_000  # jobs waiting in all
    max_queued_per_team: int = 1_000
    max_wait_seconds: float = 3600.0  # then the job ends as ERROR, never charged
    poll_seconds: float = 0.2  # how often the dispatcher looks for room when nothing woke it

    @property
    def limits_upstream(self) -> bool:
        """Whether the account's limits are counted (then every submit takes a slot through the store's gate)."""
        return self.max_in_flight is not None or self.submits_per_second is not None

    @property
    def interval(self) -> float:
        """Seconds between submits at the configured rate (0 without one)."""
        return 1.0 / self.submits_per_second if self.submits_per_second else 0.0

    @property
    def tolerance(self) -> float:
        """How far ahead of now the rate's schedule may run: the burst, in seconds."""
        return (self.submit_burst - 1) * self.interval


def load_queue_rules(policies_dir: Path) -> QueueRules:
    """Read ``upstream.toml``; a missing file means no account limits and the default queue bounds."""
    path = policies_dir / UPSTREAM_FILE
    if not path.is_file():
        return QueueRules()
    root = read_toml(path)
    account = root.table("account", required=False)
    in_flight = account.raw("max_in_flight", None)
    if in_flight is not None:
        in_flight = account.integer("max_in_flight", minimum=1)
    rate = account.raw("submits_per_second", None)
    if rate is not None:
        rate = account.number("submits_per_second")
    rules_account = dict(max_in_flight=in_flight, submits_per_second=rate,
                         submit_burst=account.integer("submit_burst", 1, minimum=1),
                         throttle_seconds=account.number("throttle_seconds", 5.0))
    account.done()
    queue = root.table("queue", required=False)
    rules = QueueRules(
        **rules_account,
        max_queued=queue.integer("max_queued", 10_000, minimum=1),
        max_queued_per_team=queue.integer("max_queued_per_team", 1_000, minimum=1),
        max_wait_seconds=queue.number("max_wait_seconds", 3600.0),
        poll_seconds=queue.number("poll_seconds", 0.2),
    )
    queue.done()
    root.done()
    return rules


def stride(weight: int) -> int:
    """What one job sent adds to its team's pass."""
    return STRIDE // max(1, weight)


@dataclass(frozen=True)
class WaitingTeam:
    """A team with jobs waiting, as the dispatcher sees it."""

    team: str
    pass_value: int
    head_job_id: int  # its oldest waiting job (ties between teams go to the older head)
    weight: int
    running: int  # its jobs sent and not ended
    max_concurrent: int | None

    @property
    def stride(self) -> int:
        """What sending one of its jobs adds to its pass."""
        return stride(self.weight)


def next_team(teams: list[WaitingTeam]) -> WaitingTeam | None:
    """The team whose job goes next: the lowest pass among those below their own limit (None: none may send)."""
    eligible = [t for t in teams if t.max_concurrent is None or t.running < t.max_concurrent]
    if not eligible:
        return None
    return min(eligible, key=lambda t: (t.pass_value, t.head_job_id))


def fairness_bound(place: int, weight: int, others: list[int]) -> int:
    """At most how many jobs of other waiting teams (weights ``others``) go before place ``place`` of a team of
    ``weight``: the README's bound."""
    return sum(math.ceil(place * other / weight) + 1 for other in others)


def priority_problem(value: str) -> tuple[int | None, str | None]:
    """(the priority, None) from a header value, or (None, why it is refused)."""
    low, high = PRIORITY_RANGE
    try:
        priority = int(value.strip())
    except ValueError:
        return None, f"{PRIORITY_HEADER} must be a whole number between {low} and {high}"
    if not low <= priority <= high:
        return None, f"{PRIORITY_HEADER} must be a whole number between {low} and {high}"
    return priority, None


def pause_from(retry_after: str | None, default: float, now: float) -> float:
    """The moment a 429's ``Retry-After`` (seconds or an HTTP date) says submits may resume; ``default`` seconds
    from ``now`` without one."""
    if retry_after is not None:
        if retry_after.isdigit():
            return now + int(retry_after)
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            return email.utils.parsedate_to_datetime(retry_after).timestamp()
    return now + default
