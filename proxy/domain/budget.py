"""Team budgets: periods and the budget policy file.

The ``budget`` policy (:mod:`proxy.pipeline.s8_budget`) turns a priced request into a
:class:`~proxy.values.Hold`: how
much to reserve, in which period, against which caps. The reservation itself
happens in the store, in the same transaction that records the job, as a
conditional update (``spent + reserved + estimate <= limit + credit``) on each
scope's running totals: concurrent submits cannot overspend, and a crash
cannot leave a reservation without its job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from .money import MICROS_PER_USD, micros_to_usd
from .policyfile import read_toml
from .values import Estimate

PERIODS = ("month", "week", "day", "total")


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


BUDGETS_FILE = "budgets.toml"


def period_key(period: str, moment: datetime) -> str:
    """The calendar bucket (UTC) that ``moment`` falls in: ``2026-11``, ``2026-W48``, ``2026-11-24``, ``total``."""
    if period == "month":
        return f"{moment.year:04d}-{moment.month:02d}"
    if period == "week":
        year, week, _ = moment.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if period == "day":
        return moment.strftime("%Y-%m-%d")
    if period == "total":
        return "total"
    raise ValueError(f"period must be one of {', '.join(PERIODS)}")


_KEY_SHAPES = {
    "month": re.compile(r"(\d{4})-(0[1-9]|1[0-2])"),
    "week": re.compile(r"(\d{4})-W(0[1-9]|[1-4]\d|5[0-3])"),
    "day": re.compile(r"(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
    "total": re.compile(r"total"),
}


#: Any period key, of any kind (matched whole with ``fullmatch``: "2026-11\n" is not a period).
PERIOD_KEY = re.compile("|".join(f"(?:{shape.pattern})" for shape in _KEY_SHAPES.values()))


def period_start(period: str, key: str) -> datetime | None:
    """The first moment (UTC) of the ``period`` bucket named ``key``; None for ``total``.

    Raises ValueError when ``key`` is not a bucket of that kind (a day key for a monthly team, 2026-02-30...).
    """
    shape = _KEY_SHAPES.get(period)
    match = shape.fullmatch(key) if shape else None
    if match is None:
        raise ValueError(f"'{key}' is not a {period} period key (like {period_key(period, datetime(2026, 11, 24))})")
    numbers = [int(group) for group in match.groups()]
    try:
        if period == "month":
            day = date(numbers[0], numbers[1], 1)
        elif period == "week":
            day = date.fromisocalendar(numbers[0], numbers[1], 1)
        elif period == "day":
            day = date(*numbers)
        else:
            return None
    except ValueError:
        raise ValueError(f"'{key}' is not a {period} that exists") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def global_key_for(team_period: str, team_key: str, global_period: str, now: datetime) -> str:
    """The gateway-wide period that an entry for the team's ``team_key`` belongs to.

    The global bucket holding the team period's first moment (a team's 2020-01 is the global 2020-01, or the
    week of 2020-01-01); a ``total`` team period has no start, so it counts in the global period of ``now``.
    """
    start = period_start(team_period, team_key)
    return period_key(global_period, start or now)


@dataclass(frozen=True)
class BudgetRules:
    """``policies/budgets.toml``, checked at start-up."""

    failed_is_charged: bool = True
    indeterminate_charged: bool = True
    soft_threshold_percent: int = 80
    global_limit_micros: int | None = None
    global_period: str = "month"
    sweep_interval_seconds: float = 60.0
    orphan_submit_seconds: float = 300.0
    stale_job_seconds: float = 21600.0
    stale_job_charged: bool = False
    probe_max_bytes: int = 8 * 1024 * 1024
    probe_timeout_seconds: float = 5.0
    probe_concurrency: int = 4
    trust_input_probe: bool = False


def load_budget_rules(policies_dir: Path) -> BudgetRules:
    root = read_toml(policies_dir / BUDGETS_FILE)
    settlement = root.table("settlement")
    teams = root.table("teams")
    wallet = root.table("global")
    sweeper = root.table("sweeper")
    probe = root.table("probe")
    limit = wallet.decimal("limit_usd", None)
    if limit is not None and limit * MICROS_PER_USD != (limit * MICROS_PER_USD).to_integral_value():
        raise wallet.error("limit_usd", "is more precise than a micro-dollar")
    percent = teams.integer("soft_threshold_percent", 80, minimum=1)
    if percent > 100:
        raise teams.error("soft_threshold_percent", "must be at most 100")
    rules = BudgetRules(
        failed_is_charged=settlement.choice("failed", ("charge", "release"), "charge") == "charge",
        indeterminate_charged=settlement.choice("indeterminate", ("charge", "release"), "charge") == "charge",
        soft_threshold_percent=percent,
        global_limit_micros=int(limit * MICROS_PER_USD) if limit is not None else None,
        global_period=wallet.choice("period", PERIODS, "month"),
        sweep_interval_seconds=sweeper.number("interval_seconds", 60.0),
        orphan_submit_seconds=sweeper.number("orphan_submit_seconds", 300.0),
        stale_job_seconds=sweeper.number("stale_job_seconds", 21600.0),
        stale_job_charged=sweeper.choice("stale_job_action", ("release", "charge"), "release") == "charge",
        probe_max_bytes=probe.integer("max_bytes", 8 * 1024 * 1024, minimum=1024),
        probe_timeout_seconds=probe.number("timeout_seconds", 5.0),
        probe_concurrency=probe.integer("concurrency", 4, minimum=1),
        trust_input_probe=probe.boolean("trust_input", False),
    )
    for section in (settlement, teams, wallet, sweeper, probe, root):
        section.done()
    return rules


def budget_headers(estimate: Estimate, view: BudgetView) -> dict[str, str]:
    return {
        "X-Proxy-Estimate-USD": micros_to_usd(estimate.amount_micros),
        "X-Proxy-Budget-Period": view.period_key,
        "X-Proxy-Budget-Remaining-USD": micros_to_usd(view.remaining_micros),
    }
