"""The money SQL: reservations, settlements and ledger rows, run inside the caller's transaction.

Running totals live in ``budget_totals`` per scope (``team:<name>``,
``user:<team>/<user>``, ``global``) and period. A reservation is one
conditional ``UPDATE`` per scope (``spent + reserved + amount <= limit +
credit``): portable, atomic without explicit locks, and the only way money
is held. Every change to a total is written to the ledger in the same
transaction. Every function here is a transaction body (:mod:`proxy.store.sql`): one piece of code for every
backend.
"""

from __future__ import annotations

from typing import Any

from ..domain.budget import BudgetView
from ..domain.errors import BudgetExceeded, TooManyRequests
from ..domain.money import micros_to_usd
from ..domain.values import Hold
from . import Decision, EntryRefused, LedgerEntry, SoftAlert, Team
from .migrations import DAY_ROLLUP_COLUMNS, DAY_ROLLUP_FROM_LEDGER
from .sql import Sql, Tx, changed, one

GLOBAL_SCOPE = "global"
CONCURRENCY_RETRY_AFTER_SECONDS = 5
LEDGER_COLUMNS = ("id, at, kind, team, user_id, handle, model, seconds, resolution, period_key, reserved_delta, "
                  "spent_delta, credit_delta, saved_micros, basis, actor, note")


def team_scope(team: str) -> str:
    return f"team:{team}"


def user_scope(team: str, user: str) -> str:
    return f"user:{team}/{user}"


def ensure_totals(scope: str, period_key: str) -> Tx[None]:
    yield Sql("INSERT INTO budget_totals (scope, period_key) VALUES (?, ?) ON CONFLICT DO NOTHING", (scope, period_key))


def totals(scope: str, period_key: str) -> Tx[tuple[int, int, int, bool]]:
    """(spent, reserved, credit, soft_alerted) of one scope and period; zeros when untouched."""
    row = yield from one("SELECT spent_micros, reserved_micros, credit_micros, soft_alerted FROM budget_totals "
                          "WHERE scope = ? AND period_key = ?", scope, period_key)
    return (row[0], row[1], row[2], bool(row[3])) if row else (0, 0, 0, False)


def budget_view(team: Team, period_key: str) -> Tx[BudgetView]:
    spent, reserved, credit, _ = yield from totals(team_scope(team.name), period_key)
    return BudgetView(team.name, period_key, team.budget_limit_micros, credit, spent, reserved)


def _caps(team: Team, user: str, hold: Hold) -> list[tuple[str, str, int | None, str]]:
    """(scope, period key, limit or None, who) for each total a job counts against."""
    return [
        (team_scope(team.name), hold.period_key, team.budget_limit_micros, "team"),
        (user_scope(team.name, user), hold.period_key, team.user_cap_micros, "user"),
        (GLOBAL_SCOPE, hold.global_period_key, hold.global_limit_micros, "global"),
    ]


def _refusal(who: str, team: Team, user: str, key: str, allowance: int, left: int, estimate: int) -> str:
    tail = f"; this request is estimated at ${micros_to_usd(estimate)}"
    if who == "team":
        return (f"Team '{team.name}' has ${micros_to_usd(left)} left of its ${micros_to_usd(allowance)} "
                f"{team.period} budget ({key}){tail}")
    if who == "user":
        return (f"User '{user}' of team '{team.name}' has ${micros_to_usd(left)} left of the "
                f"${micros_to_usd(allowance)} per-user cap ({key}){tail}")
    return f"The gateway's global budget has ${micros_to_usd(left)} left of ${micros_to_usd(allowance)} ({key}){tail}"


def _check_concurrency(team: Team) -> Tx[None]:
    if team.max_concurrent_jobs is None:
        return
    (running,) = yield from one("SELECT COUNT(*) FROM reservations WHERE team = ? AND state = 'open'", team.name)
    if running >= team.max_concurrent_jobs:
        raise TooManyRequests(
            f"Team '{team.name}' has {running} jobs running, its limit of concurrent jobs",
            headers={"Retry-After": str(CONCURRENCY_RETRY_AFTER_SECONDS)},
        )


def refusal_for(team: Team, user: str, hold: Hold) -> Tx[str | None]:
    """Why ``hold`` would be refused now (read only), or None. A team at its own job limit that queues is not
    refused: its submit would wait in the local queue."""
    try:
        if team.on_limit == "refuse":
            yield from _check_concurrency(team)
    except TooManyRequests as exc:
        return exc.message
    amount = hold.estimate.amount_micros
    for scope, key, limit, who in _caps(team, user, hold):
        if limit is None:
            continue
        spent, reserved, credit, _ = yield from totals(scope, key)
        if spent + reserved + amount > limit + credit:
            return _refusal(who, team, user, key, limit + credit, max(0, limit + credit - spent - reserved), amount)
    return None


def reserve(*, team: Team, user: str, hold: Hold, job_id: int, handle: str, model: str,
            now: str, count_jobs: bool = True) -> Tx[tuple[BudgetView, SoftAlert | None]]:
    """Hold ``hold``'s estimate against every cap, or raise (the caller's transaction then rolls back).

    ``count_jobs``: refuse a team at its ``max_concurrent_jobs`` here (False: the local queue decides instead).
    """
    if count_jobs:
        yield from _check_concurrency(team)
    estimate = hold.estimate
    after: tuple[int, int, int, bool] | None = None  # the team scope's totals as this reservation left them
    for scope, key, limit, who in _caps(team, user, hold):
        left = yield from _add_reserved(scope, key, estimate.amount_micros, limit)
        if left is not None and who == "team":
            after = left
        if left is None:
            assert limit is not None  # only a limit refuses
            spent, reserved, credit, _ = yield from totals(scope, key)
            allowance = limit + credit
            raise BudgetExceeded(_refusal(who, team, user, key, allowance, max(0, allowance - spent - reserved),
                                          estimate.amount_micros))
    yield Sql(
        "INSERT INTO reservations (job_id, handle, team, user_id, model, period_key, global_period_key, amount_micros, "
        "seconds, resolution, basis, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)",
        (job_id, handle, team.name, user, model, hold.period_key, hold.global_period_key, estimate.amount_micros,
         estimate.seconds, estimate.resolution, estimate.basis, now),
    )
    yield from insert_ledger(at=now, kind="reserve", team=team.name, user_id=user, handle=handle, job_id=job_id,
                             model=model, seconds=estimate.seconds, resolution=estimate.resolution,
                             period_key=hold.period_key, global_period_key=hold.global_period_key,
                             reserved_delta=estimate.amount_micros, basis=estimate.basis)
    assert after is not None  # the team scope is always the first cap, and it was reserved
    spent, reserved, credit, alerted = after
    view = BudgetView(team.name, hold.period_key, team.budget_limit_micros, credit, spent, reserved)
    return view, (yield from _soft_alert(team, hold.period_key, spent + reserved, credit, alerted))


def _add_reserved(scope: str, key: str, amount: int, limit: int | None) -> Tx[tuple[int, int, int, bool] | None]:
    """Add ``amount`` to the scope's reserved total if spent + reserved stays within ``limit`` (None: no limit);
    the scope's (spent, reserved, credit, soft_alerted) as the update left them, or None if it was refused.

    The conditional update comes first; only when it changes nothing is the period's row created (its first
    use) and the update tried once more, so the common case is one statement instead of two. (Refusing when this
    insert found the row already there would refuse the losers of a race to first use a scope on PostgreSQL.) On PostgreSQL a
    concurrent reservation of the same scope waits for this row and then re-checks the condition against what
    this one left (READ COMMITTED re-evaluates an UPDATE's WHERE on the row it waited for): no overspend.
    """
    sql = "UPDATE budget_totals SET reserved_micros = reserved_micros + ? WHERE scope = ? AND period_key = ?"
    params: tuple[Any, ...] = (amount, scope, key)
    if limit is not None:
        sql += " AND spent_micros + reserved_micros + ? <= ? + credit_micros"
        params += (amount, limit)
    sql += " RETURNING spent_micros, reserved_micros, credit_micros, soft_alerted"  # no read of them afterwards
    row = yield from one(sql, *params)
    if row is None:
        # Created here, or by a concurrent first use on another connection (this insert then waited for it):
        # either way the row exists now, and the condition decides.
        yield Sql("INSERT INTO budget_totals (scope, period_key) VALUES (?, ?) ON CONFLICT DO NOTHING", (scope, key))
        row = yield from one(sql, *params)
    return None if row is None else (row[0], row[1], row[2], bool(row[3]))


def _soft_alert(team: Team, period_key: str, used: int, credit: int, alerted: bool) -> Tx[SoftAlert | None]:
    """Mark and return the team's soft alert for the period the first time usage reaches the threshold.

    The mark is a conditional update, so however many replicas cross the threshold together, one alerts.
    """
    allowance = team.budget_limit_micros + credit
    if alerted or allowance <= 0 or used * 100 < team.soft_threshold_percent * allowance:
        return None
    marked = yield from changed("UPDATE budget_totals SET soft_alerted = 1 WHERE scope = ? AND period_key = ? "
                                 "AND soft_alerted = 0", team_scope(team.name), period_key)
    return SoftAlert(team.name, period_key, team.soft_threshold_percent, used, allowance) if marked == 1 else None


def resolve(job_id: int, decision: Decision, now: str) -> Tx[bool]:
    """End the job's open reservation as ``decision`` says; False if it had none open."""
    row = yield from one(
        "SELECT handle, team, user_id, model, period_key, global_period_key, amount_micros FROM reservations "
        "WHERE job_id = ? AND state = 'open'", job_id)
    if row is None:
        return False
    handle, team, user, model, key, global_key, amount = row
    state = "settled" if decision.kind == "settle" else "released"
    ended = yield from changed("UPDATE reservations SET state = ?, resolved_at = ?, note = ? "
                                "WHERE job_id = ? AND state = 'open'", state, now, decision.note, job_id)
    if ended != 1:
        return False
    spent_delta = decision.charge_micros if decision.kind == "settle" else 0
    for scope, period in ((team_scope(team), key), (user_scope(team, user), key), (GLOBAL_SCOPE, global_key)):
        yield Sql(
            "UPDATE budget_totals SET reserved_micros = reserved_micros - ?, spent_micros = spent_micros + ? "
            "WHERE scope = ? AND period_key = ?",
            (amount, spent_delta, scope, period),
        )
    yield from insert_ledger(at=now, kind=decision.kind, team=team, user_id=user, handle=handle, job_id=job_id,
                             model=model, seconds=decision.seconds, resolution=decision.resolution, period_key=key,
                             global_period_key=global_key, reserved_delta=-amount, spent_delta=spent_delta,
                             basis=decision.basis, note=decision.note)
    return True


def insert_ledger(**columns: Any) -> Tx[int]:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    (entry_id,) = yield from one(f"INSERT INTO ledger ({names}) VALUES ({marks}) RETURNING id", *columns.values())
    return int(entry_id)


def add_entry(*, team: Team, kind: str, amount: int, period_key: str, global_period_key: str, actor: str,
              note: str, now: str) -> Tx[int]:
    """A manual ``adjust`` (signed spend) or ``topup`` (allowance) for a team's period.

    A top-up raises the team's allowance for ``period_key`` only (never the global cap, which is the company's
    wallet). An adjustment changes the spend of the team's ``period_key`` and of the global ``global_period_key``
    (the caller maps one to the other); per-user totals are left alone, as the entry names no user. A negative
    adjustment may not take either spend below zero: a refund cannot exceed what was spent in that period, so it
    can never lift the global cap.
    """
    scope = team_scope(team.name)
    yield from ensure_totals(scope, period_key)
    if kind == "topup":
        yield Sql("UPDATE budget_totals SET credit_micros = credit_micros + ? WHERE scope = ? AND period_key = ?",
                  (amount, scope, period_key))
        deltas = {"credit_delta": amount}
    else:
        yield from ensure_totals(GLOBAL_SCOPE, global_period_key)
        for total_scope, key, who in ((scope, period_key, f"team '{team.name}'"),
                                      (GLOBAL_SCOPE, global_period_key, "the gateway")):
            moved = yield from changed("UPDATE budget_totals SET spent_micros = spent_micros + ? "
                                          "WHERE scope = ? AND period_key = ? AND spent_micros + ? >= 0",
                                          amount, total_scope, key, amount)
            if moved != 1:
                spent, _, _, _ = yield from totals(total_scope, key)
                raise EntryRefused(f"An adjustment of ${micros_to_usd(amount)} would take the spend of {who} in "
                                   f"{key} below zero: only ${micros_to_usd(spent)} was spent there")
        deltas = {"spent_delta": amount}
    return (yield from insert_ledger(at=now, kind=kind, team=team.name, period_key=period_key,
                                     global_period_key=global_period_key, actor=actor, note=note, **deltas))


def ledger_entry(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(*row)


def _against_ledger(scope: str, keys: str, period: str, credit: str, where: str) -> str:
    """Totals rows of one kind against the ledger summed once per (scope, period): one pass over the ledger,
    not a pass per totals row (a join on a computed scope cannot use an index)."""
    return f"""
    WITH l AS (SELECT {scope} AS scope, {period} AS period_key, SUM(spent_delta) AS spent,
                      SUM(reserved_delta) AS reserved, {credit} AS credit
               FROM ledger {where} GROUP BY {keys})
    SELECT t.scope, t.period_key, t.spent_micros, t.reserved_micros, t.credit_micros,
           COALESCE(l.spent, 0), COALESCE(l.reserved, 0), COALESCE(l.credit, 0)
    FROM budget_totals t LEFT JOIN l ON l.scope = t.scope AND l.period_key = t.period_key"""


MISMATCH_QUERIES = (
    # team totals against the ledger
    _against_ledger("'team:' || team", "team, period_key", "period_key", "SUM(credit_delta)", "")
    + " WHERE t.scope LIKE 'team:%'",
    # per-user totals (a user's credit is always 0: top-ups are the team's)
    _against_ledger("'user:' || team || '/' || user_id", "team, user_id, period_key", "period_key", "0",
                    "WHERE user_id IS NOT NULL") + " WHERE t.scope LIKE 'user:%'",
    # the gateway-wide totals
    _against_ledger("'global'", "global_period_key", "global_period_key", "0", "") + " WHERE t.scope = 'global'",
    # open reservations against reserved totals
    """WITH r AS (SELECT 'team:' || team AS scope, period_key, SUM(amount_micros) AS reserved FROM reservations
                  WHERE state = 'open' GROUP BY team, period_key)
       SELECT t.scope, t.period_key, 0, t.reserved_micros, 0, 0, COALESCE(r.reserved, 0), 0
       FROM budget_totals t LEFT JOIN r ON r.scope = t.scope AND r.period_key = t.period_key
       WHERE t.scope LIKE 'team:%'""",
)


def mismatches() -> Tx[list[str]]:
    found: list[str] = []
    for query in MISMATCH_QUERIES:
        for scope, key, spent, reserved, credit, l_spent, l_reserved, l_credit in (yield Sql(query)).fetchall():
            if (spent, reserved, credit) != (l_spent, l_reserved, l_credit):
                found.append(f"{scope} {key}: totals spent={spent} reserved={reserved} credit={credit}, "
                             f"ledger spent={l_spent} reserved={l_reserved} credit={l_credit}")
    for team, model, spent, saved, l_spent, l_saved in (yield Sql(ROLLUP_MISMATCHES)).fetchall():
        found.append(f"metrics rollup {team}/{model}: spent={spent} saved={saved}, ledger spent={l_spent} saved={l_saved}")
    for model, status, jobs, counted in (yield Sql(JOB_COUNT_MISMATCHES)).fetchall():
        found.append(f"job count {model}/{status}: {jobs} counted, {counted} jobs")
    for team, day, key, model, resolution, *figures in (yield Sql(DAY_ROLLUP_MISMATCHES)).fetchall():
        found.append(f"day rollup {team} {day} ({key}) {model or '-'}/{resolution or '-'}: "
                     f"jobs, seconds, charged, hits, saved = {figures[:5]}, ledger {figures[5:]}")
    return found


def rebuild_day_rollup() -> Tx[int]:
    """The per-day rollup recomputed from the ledger (``pixazo-proxy rollup rebuild``); the rows it now holds."""
    yield Sql("DELETE FROM day_rollup")
    yield Sql(f"INSERT INTO day_rollup ({DAY_ROLLUP_COLUMNS}) {DAY_ROLLUP_FROM_LEDGER}")
    (rows,) = yield from one("SELECT COUNT(*) FROM day_rollup")
    return int(rows)


#: The /metrics rollups against what they summarise, both ways round (a row missing on either side is a mismatch).
ROLLUP_MISMATCHES = """
    WITH l AS (SELECT team, COALESCE(model, '') AS model,
                      SUM(CASE WHEN kind = 'settle' THEN spent_delta ELSE 0 END) AS spent,
                      SUM(CASE WHEN kind = 'saving' THEN saved_micros ELSE 0 END) AS saved
               FROM ledger WHERE kind IN ('settle', 'saving') GROUP BY team, COALESCE(model, '')),
         both_sides AS (SELECT team, model FROM l UNION SELECT team, model FROM spend_rollup)
    SELECT b.team, b.model, r.spent_micros, r.saved_micros, l.spent, l.saved FROM both_sides b
    LEFT JOIN spend_rollup r ON r.team = b.team AND r.model = b.model
    LEFT JOIN l ON l.team = b.team AND l.model = b.model
    WHERE COALESCE(r.spent_micros, 0) != COALESCE(l.spent, 0) OR COALESCE(r.saved_micros, 0) != COALESCE(l.saved, 0)
"""
JOB_COUNT_MISMATCHES = """
    WITH j AS (SELECT model, status, COUNT(*) AS jobs FROM jobs GROUP BY model, status),
         both_sides AS (SELECT model, status FROM j UNION SELECT model, status FROM job_counts)
    SELECT b.model, b.status, COALESCE(c.jobs, 0), COALESCE(j.jobs, 0) FROM both_sides b
    LEFT JOIN job_counts c ON c.model = b.model AND c.status = b.status
    LEFT JOIN j ON j.model = b.model AND j.status = b.status
    WHERE COALESCE(c.jobs, 0) != COALESCE(j.jobs, 0)
"""
_DAY_FIGURES = ("jobs", "seconds", "charged_micros", "hits", "saved_micros")
_DAY_KEY = ("team", "day", "period_key", "model", "resolution")
#: The per-day rollup against the ledger it summarises, both ways round.
DAY_ROLLUP_MISMATCHES = f"""
    WITH l ({", ".join(_DAY_KEY + _DAY_FIGURES)}) AS ({DAY_ROLLUP_FROM_LEDGER}),
         both_sides AS (SELECT {", ".join(_DAY_KEY)} FROM l UNION SELECT {", ".join(_DAY_KEY)} FROM day_rollup)
    SELECT {", ".join(f"b.{name}" for name in _DAY_KEY)},
           {", ".join(f"COALESCE(r.{name}, 0)" for name in _DAY_FIGURES)},
           {", ".join(f"COALESCE(l.{name}, 0)" for name in _DAY_FIGURES)}
    FROM both_sides b
    LEFT JOIN day_rollup r ON {" AND ".join(f"r.{name} = b.{name}" for name in _DAY_KEY)}
    LEFT JOIN l ON {" AND ".join(f"l.{name} = b.{name}" for name in _DAY_KEY)}
    WHERE {" OR ".join(f"COALESCE(r.{name}, 0) != COALESCE(l.{name}, 0)" for name in _DAY_FIGURES)}
"""
