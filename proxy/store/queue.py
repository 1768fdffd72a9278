"""The local queue's SQL: admission, the fair dispatch, requeue after a 429, cancel and expiry.

Every function here is a transaction body (:mod:`proxy.store.sql`), run in the caller's transaction, the same on
every backend. Three things are kept in the store so that every process and replica agrees on them:

* ``upstream_gate`` (one row): the upstream slots held (``in_flight``; a job holds one from when it is sent until
  it ends or goes back to waiting, released by the ``jobs_free_slot`` trigger in that same transaction), the
  jobs waiting (``queued``), when the next submit may go at the configured rate (``next_send``), and the fair
  clock. Taking a slot is one conditional ``UPDATE`` of that row, like a reservation of money, so two replicas
  cannot both take the last one;
* ``queued_jobs``: one row per waiting job, in its team's order (priority, then arrival);
* ``queue_teams``: each team's pass (:mod:`proxy.queueing`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..domain.errors import Conflict, TooManyRequests
from ..domain.queueing import CLIENT_STATUS, WAITING, QueueRules, WaitingTeam, next_team
from . import Admission, Decision, Dispatch, JobUpdate, QueuePlace, QueueRow, Team
from .accounts import CONCURRENCY_RETRY_AFTER_SECONDS
from .sql import Sql, Tx, changed, every, one

QUEUE_FULL_RETRY_AFTER_SECONDS = 30
#: The statuses a job holds an upstream slot in (sent, or being sent, and not ended).
SENT = ("SUBMITTING", "QUEUED", "PROCESSING", "INDETERMINATE")
EXPIRED = ("This request waited {waited:g} s in the gateway's queue for upstream capacity, longer than the "
           "{limit:g} s allowed; it was never sent and is not charged")
CANCELLED = "Cancelled by {who} while it waited in the gateway's queue; it was never sent and is not charged"
REFUSED = "The upstream refused this queued request when the gateway sent it: {reason}; it is not charged"


def running(team: str) -> Tx[int]:
    """The team's jobs that hold money and are not waiting: sent, being sent, or of unknown outcome."""
    (held,) = yield from one("SELECT COUNT(*) FROM reservations WHERE team = ? AND state = 'open'", team)
    (waiting,) = yield from one("SELECT COUNT(*) FROM queued_jobs WHERE team = ?", team)
    return int(held) - int(waiting)


def _take_slot(rules: QueueRules, now: float, *, only_if_none_wait: bool) -> Tx[bool]:
    """Take one upstream slot and one turn of the rate, if both are free now (and, for a new submit, nobody
    waits ahead of it); one conditional update of the gate row."""
    condition: list[str] = []
    params: list[float] = []
    if only_if_none_wait:
        condition.append("queued = 0")
    if rules.max_in_flight is not None:
        condition.append("in_flight < ?")
        params.append(rules.max_in_flight)
    condition.append("next_send <= ?")  # the rate's schedule, or a pause after an upstream 429
    params.append(now + rules.tolerance)
    where = " AND ".join(["id = 1", *condition])
    taken = yield from changed(
        "UPDATE upstream_gate SET in_flight = in_flight + 1, "
        "next_send = CASE WHEN next_send > ? THEN next_send ELSE ? END + ? WHERE " + where,
        now, now, rules.interval, *params)
    return taken == 1


def lock_gate() -> Tx[None]:
    """Lock the gate row first (PostgreSQL; SQLite's one writer already serializes): every transaction that changes
    the gate takes its locks in one order, gate, then job counts, then money totals, so none can deadlock."""
    yield Sql("SELECT id FROM upstream_gate WHERE id = 1 FOR UPDATE", (), postgres_only=True)


def counts(team: Team, rules: QueueRules) -> bool:
    """Whether every submit of ``team`` is counted at the gate (its transaction locks the gate row first)."""
    return rules.limits_upstream or team.max_concurrent_jobs is not None


def gated(team: Team, rules: QueueRules, now: float) -> Tx[bool]:
    """Whether this submit goes through the gate: always when it is counted; otherwise only while submits are
    paused after an upstream 429 (one read of the gate row), so a pause holds back every submit, not only the
    jobs that met the 429. Read before anything is locked; the caller then locks the gate first."""
    return counts(team, rules) or (yield from _paused(now))


def _paused(now: float) -> Tx[bool]:
    """Whether submits are paused now (after an upstream 429)."""
    (next_send,) = yield from one("SELECT next_send FROM upstream_gate WHERE id = 1")
    return bool(next_send > now)


def admit(team: Team, user: str, job_id: int, handle: str, model: str, admission: Admission,
          through_gate: bool) -> Tx[QueuePlace | None]:
    """Decide, in the submission's transaction, whether job ``job_id`` (its money reserved next) is sent now
    (None; with the account's limits counted, it then holds a slot) or waits in the queue (its place).

    A team at its own ``max_concurrent_jobs`` waits, or is refused with 429 if its ``on_limit`` is ``refuse``;
    with the account's limits counted, a submit waits whenever anyone waits (so nobody jumps the queue) or there
    is no room; while submits are paused after an upstream 429, every submit waits. A full queue refuses with 429
    (the transaction then rolls back, reservation and all). ``through_gate``: what :func:`gated` said.
    """
    rules = admission.rules
    if not through_gate:
        return None  # nothing to count, no pause: the common case
    (team_waiting,) = yield from one("SELECT COUNT(*) FROM queued_jobs WHERE team = ?", team.name)
    at_limit = False
    if team.max_concurrent_jobs is not None:
        busy = yield from running(team.name)  # this job's own reservation is made after this
        at_limit = busy >= team.max_concurrent_jobs
        if at_limit and team.on_limit == "refuse":
            raise TooManyRequests(
                f"Team '{team.name}' has {busy} jobs running, its limit of concurrent jobs",
                headers={"Retry-After": str(CONCURRENCY_RETRY_AFTER_SECONDS)})
    if not at_limit and team_waiting == 0:
        if not rules.limits_upstream:
            if not (yield from _paused(admission.now)):
                return None
        elif (yield from _take_slot(rules, admission.now, only_if_none_wait=True)):
            yield Sql("UPDATE jobs SET holds_slot = 1 WHERE id = ?", (job_id,))
            return None
    (queued,) = yield from one("SELECT queued FROM upstream_gate WHERE id = 1")
    if queued >= rules.max_queued or team_waiting >= rules.max_queued_per_team:
        which = (f"team '{team.name}' has {team_waiting} requests waiting, its limit"
                 if team_waiting >= rules.max_queued_per_team else f"{queued} requests wait, the gateway's limit")
        raise TooManyRequests(f"The gateway's queue is full ({which}); retry later",
                              headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_SECONDS)})
    yield Sql("UPDATE jobs SET status = ? WHERE id = ?", (WAITING, job_id))
    return (yield from _enter_queue(job_id, handle, team.name, user, model, admission.priority, admission.now,
                                    admission.now + rules.max_wait_seconds, team_waiting))


def _enter_queue(job_id: int, handle: str, team: str, user: str, model: str, priority: int, enqueued_at: float,
                 deadline: float, team_waiting: int) -> Tx[QueuePlace]:
    """The queue row of a job just made WAITING, its team's pass if the team starts waiting now (at the fair
    clock, or its own later pass, so an idle spell banks no turns), the gate's count; its place."""
    yield Sql("INSERT INTO queued_jobs (job_id, handle, team, user_id, model, priority, enqueued_at, deadline) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (job_id, handle, team, user, model, priority, enqueued_at, deadline))
    if team_waiting == 0:
        yield Sql("INSERT INTO queue_teams (team, pass) SELECT ?, fair_clock FROM upstream_gate WHERE id = 1 "
                  "ON CONFLICT (team) DO UPDATE SET pass = CASE WHEN queue_teams.pass > excluded.pass "
                  "THEN queue_teams.pass ELSE excluded.pass END", (team,))
    yield Sql("UPDATE upstream_gate SET queued = queued + 1 WHERE id = 1")
    found = yield from place(job_id)
    assert found is not None  # its row was just written
    return found


def place(job_id: int) -> Tx[QueuePlace | None]:
    """Where waiting job ``job_id`` stands in its team's queue, or None if it is not waiting."""
    row = yield from one("SELECT team, priority, enqueued_at FROM queued_jobs WHERE job_id = ?", job_id)
    if row is None:
        return None
    team, priority, enqueued_at = row
    (ahead,) = yield from one("SELECT COUNT(*) FROM queued_jobs WHERE team = ? AND (priority > ? OR "
                              "(priority = ? AND job_id < ?))", team, priority, priority, job_id)
    return QueuePlace(int(ahead) + 1, max(0.0, time.time() - float(enqueued_at)))


def waiting_teams() -> Tx[list[WaitingTeam]]:
    rows = yield from every(
        "SELECT q.team, COALESCE(p.pass, 0), MIN(q.job_id), t.weight, t.max_concurrent_jobs FROM queued_jobs q "
        "JOIN teams t ON t.name = q.team LEFT JOIN queue_teams p ON p.team = q.team "
        "GROUP BY q.team, p.pass, t.weight, t.max_concurrent_jobs")
    teams = []
    for team, pass_value, head, weight, max_concurrent in rows:
        busy = (yield from running(team)) if max_concurrent is not None else 0
        teams.append(WaitingTeam(team, int(pass_value), int(head), int(weight), busy, max_concurrent))
    return teams


def take_next(rules: QueueRules, now: float, sent_at: str) -> Tx[Dispatch | float | None]:
    """Take the next waiting job in fair order and mark it SUBMITTING, holding its slot: a :class:`Dispatch`;
    or, when none may go now, how many seconds until the rate allows one (a float), or None (nothing to send
    until a slot frees, a team drops below its limit, or a job arrives)."""
    yield from lock_gate()
    gate = yield from one("SELECT in_flight, queued, next_send FROM upstream_gate WHERE id = 1")
    in_flight, queued, next_send = gate
    if queued <= 0:
        return None
    if rules.max_in_flight is not None and in_flight >= rules.max_in_flight:
        return None
    if next_send > now + rules.tolerance:  # the rate, or a pause after an upstream 429
        return float(next_send - rules.tolerance - now)
    chosen = next_team((yield from waiting_teams()))
    if chosen is None:
        return None
    row = yield from one("SELECT job_id, handle, user_id, model, priority, enqueued_at, deadline FROM queued_jobs "
                         "WHERE team = ? ORDER BY priority DESC, job_id LIMIT 1", chosen.team)
    job_id, handle, user, model, priority, enqueued_at, deadline = row
    if rules.limits_upstream and not (yield from _take_slot(rules, now, only_if_none_wait=False)):
        return None
    yield Sql("DELETE FROM queued_jobs WHERE job_id = ?", (job_id,))
    sent = yield from one("UPDATE jobs SET status = 'SUBMITTING', holds_slot = ?, sent_at = ?, updated_at = ? "
                          "WHERE id = ? AND status = ? RETURNING params",
                          1 if rules.limits_upstream else 0, sent_at, sent_at, job_id, WAITING)
    yield Sql("UPDATE queue_teams SET pass = pass + ? WHERE team = ?", (chosen.stride, chosen.team))
    yield Sql("UPDATE upstream_gate SET queued = queued - 1, fair_clock = ? WHERE id = 1", (chosen.pass_value,))
    if sent is None:  # not waiting after all (a repair by hand): its queue row is gone, look again
        return 0.0
    return Dispatch(int(job_id), str(handle), chosen.team, str(user), str(model), json.loads(sent[0]),
                    float(enqueued_at), float(deadline), int(priority), chosen.stride)


def requeue(dispatch: Dispatch, pause_until: float | None) -> Tx[QueuePlace | None]:
    """Put a dispatched job back at the head of its team's queue (the upstream said 429, or provably never got it):
    its slot is freed by the status change; with ``pause_until``, no submit goes before then. Its place, or None
    if it was not being sent."""
    yield from lock_gate()
    back = yield from changed("UPDATE jobs SET status = ?, sent_at = NULL WHERE id = ? AND status = 'SUBMITTING'",
                              WAITING, dispatch.job_id)
    if back != 1:
        return None
    (team_waiting,) = yield from one("SELECT COUNT(*) FROM queued_jobs WHERE team = ?", dispatch.team)
    found = yield from _enter_queue(dispatch.job_id, dispatch.handle, dispatch.team, dispatch.user, dispatch.model,
                                    dispatch.priority, dispatch.enqueued_at, dispatch.deadline, team_waiting)
    yield Sql("UPDATE queue_teams SET pass = pass - ? WHERE team = ?", (dispatch.stride, dispatch.team))
    if pause_until is not None:
        yield Sql("UPDATE upstream_gate SET next_send = CASE WHEN next_send > ? THEN next_send ELSE ? END "
                  "WHERE id = 1", (pause_until, pause_until))
    return found


def end_waiting(job_id: int, error: str, update_job: Any, now: str) -> Tx[bool]:
    """End a waiting job as ERROR with ``error``, releasing its money (cancel, expiry): False if not waiting."""
    yield from lock_gate()
    gone = yield from changed("DELETE FROM queued_jobs WHERE job_id = ?", job_id)
    if gone != 1:
        return False
    yield Sql("UPDATE upstream_gate SET queued = queued - 1 WHERE id = 1")
    stamp = now
    ended = yield from update_job(job_id, JobUpdate("ERROR", None, error, stamp, stamp, time.time()),
                                  Decision.release(error[:200]), now)
    return bool(ended)


def cancel(handle: str, who: str, update_job: Any, now: str) -> Tx[str]:
    """Cancel the waiting job of ``handle``: "cancelled", or raise :class:`Conflict` naming why it cannot be."""
    row = yield from one("SELECT j.id, j.status FROM handles h JOIN jobs j ON j.id = h.job_id WHERE h.id = ?", handle)
    job_id, status = row
    if status in ("COMPLETED", "FAILED", "ERROR"):
        raise Conflict(f"This request has already ended ({status}); there is nothing to cancel")
    if status != WAITING:
        raise Conflict(f"This request was already sent to the upstream (it is {_client_status(status)}); a job the "
                       "upstream has cannot be cancelled")
    (handles,) = yield from one("SELECT COUNT(*) FROM handles WHERE job_id = ?", job_id)
    if handles > 1:
        raise Conflict(f"This queued job is shared by {handles} identical requests; it cannot be cancelled by one")
    if not (yield from end_waiting(job_id, CANCELLED.format(who=who), update_job, now)):
        raise Conflict("This request is being sent to the upstream right now; it cannot be cancelled")
    return "cancelled"


def expired(now: float, limit: int) -> Tx[list[tuple[int, float, float]]]:
    """(job id, enqueued at, deadline) of waiting jobs past their deadline."""
    rows = yield from every("SELECT job_id, enqueued_at, deadline FROM queued_jobs WHERE deadline <= ? "
                            "ORDER BY deadline LIMIT ?", now, limit)
    return [(int(job_id), float(enqueued), float(deadline)) for job_id, enqueued, deadline in rows]


def reconcile() -> Tx[tuple[int, int]]:
    """Recount the gate from the jobs (at start): every sent, unfinished job holds a slot, every queue row is one
    waiting job. The gate row is locked first, so a submit taking a slot meanwhile is counted once."""
    yield Sql("UPDATE upstream_gate SET in_flight = in_flight WHERE id = 1")
    marks = ", ".join(f"'{status}'" for status in SENT)
    yield Sql(f"UPDATE jobs SET holds_slot = 1 WHERE holds_slot = 0 AND status IN ({marks})")
    (held,) = yield from one("SELECT COUNT(*) FROM jobs WHERE holds_slot = 1")
    (waiting,) = yield from one("SELECT COUNT(*) FROM queued_jobs")
    yield Sql("UPDATE upstream_gate SET in_flight = ?, queued = ? WHERE id = 1", (int(held), int(waiting)))
    return int(held), int(waiting)


def rows(team: str | None, limit: int) -> Tx[list[QueueRow]]:
    sql = "SELECT handle, team, user_id, model, priority, enqueued_at FROM queued_jobs"
    params: tuple[Any, ...] = ()
    if team is not None:
        sql += " WHERE team = ?"
        params = (team,)
    found = yield from every(sql + " ORDER BY team, priority DESC, job_id LIMIT ?", *params, limit)
    return [QueueRow(*row) for row in found]


def _client_status(status: str) -> str:
    return CLIENT_STATUS if status == WAITING else status
