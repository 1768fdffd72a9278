"""A team's console page and its forms: settings, top-ups, adjustments, the webhook secret, the ledger as CSV."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ..domain.budget import PERIOD_KEY, period_key, period_start
from ..domain.errors import FieldError
from ..domain.tabular import write_csv
from ..http.admin import add_money_entry, change_team, entry_json
from ..store import DaySpend, QueueRow, Team
from ..store.sqlstore import LEDGER_KINDS
from .pages import _DAY, PAGE_SIZE, Visit, _headers, _need_admin, _render, _team, _text, page, short_model

logger = logging.getLogger(__name__)


def _periods(team: Team, now: datetime) -> tuple[tuple[str, date, date], tuple[str, date, date] | None]:
    """(key, first day, last day) of the team's current period and of the one before (None for ``total``)."""
    current = period_key(team.period, now)
    start = period_start(team.period, current)
    if start is None:
        return (current, date(2000, 1, 1), now.date()), None
    following = {"day": timedelta(days=1), "week": timedelta(days=7)}.get(team.period)
    if following is not None:
        end = start + following
    else:
        end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    before_start = period_start(team.period, period_key(team.period, start - timedelta(days=1)))
    assert before_start is not None
    previous_key = period_key(team.period, before_start)
    return ((current, start.date(), (end - timedelta(days=1)).date()),
            (previous_key, before_start.date(), (start - timedelta(days=1)).date()))


def _chart(lines: list[DaySpend], period: str, first: date, last: date) -> dict[str, Any]:
    """Spend per day of one period, a series per model (micro-dollars as USD numbers for the chart only)."""
    mine = [line for line in lines if line.period_key == period]
    days = [(first + timedelta(days=n)) for n in range((last - first).days + 1)]
    models = sorted({line.model for line in mine})
    index = {day.strftime(_DAY): n for n, day in enumerate(days)}
    series = {model: [0] * len(days) for model in models}
    for line in mine:
        if line.day in index:
            series[line.model][index[line.day]] += line.charged_micros
    return {"period": period, "days": [int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) for d in days],
            "series": [{"label": short_model(model) if model else "adjustments", "micros": values}
                       for model, values in series.items()]}


@page
async def team_page(request: web.Request, visit: Visit) -> web.StreamResponse:
    team = await _team(visit, request.match_info["team"])
    return await _team_view(request, visit, team)


async def _team_view(request: web.Request, visit: Visit, team: Team, *, errors: dict[str, str] | None = None,
                     form: dict[str, Any] | None = None, notice: str | None = None, secret: str | None = None,
                     status: int = 200) -> web.StreamResponse:
    services = visit.services
    now = services.clock.now()
    (key, first, last), previous = _periods(team, now)
    since = previous[1] if previous else first
    lines = await services.store.daily_spend(team.name, since.strftime(_DAY), last.strftime(_DAY))
    if previous is None:  # a total budget: its chart starts on its first day of spend, not at the range's start
        first = min((date.fromisoformat(line.day) for line in lines), default=last)
    charts = [_chart(lines, key, first, last)] + ([_chart(lines, *previous)] if previous else [])
    [report] = await services.store.spend_report({team.name: key})
    ledger_filter = _ledger_filter(request, team, key)
    entries = await services.store.ledger(team.name, ledger_filter["period"], PAGE_SIZE + 1,
                                          ledger_filter["before"], ledger_filter["kind"], ledger_filter["user"])
    more = len(entries) > PAGE_SIZE
    entries = entries[:PAGE_SIZE]
    csv_query = urlencode({k: v for k, v in ledger_filter.items() if v is not None and k != "before"})
    next_page = (f"?{urlencode({**{k: v for k, v in ledger_filter.items() if v is not None}, 'before': entries[-1].id})}"
                 if more and entries else None)
    waiting = await services.store.queue_rows(team.name, QUEUE_ROWS)
    queue = [_waiting(row) for row in waiting]
    oldest = _waited(min((row.enqueued_at for row in waiting), default=time.time()))
    return _render(
        request, "team.html", visit, status=status, team=team, report=report, charts=charts,
        queue=queue, queue_limit=QUEUE_ROWS, queue_oldest=oldest,
        table=[line for line in lines if line.period_key in (key, previous[0] if previous else key)],
        top_users=await services.store.top_users(team.name, key),
        refusals=await services.store.recent_refusals(team.name),
        entries=entries, ledger_filter=ledger_filter, kinds=LEDGER_KINDS, csv_query=csv_query, next_page=next_page,
        errors=errors or {}, form=form or {}, notice=notice, secret=secret, period=key,
        previous=previous[0] if previous else None)


QUEUE_ROWS = 50


@dataclass(frozen=True)
class _Waiting:
    handle: str
    user: str
    model: str
    priority: int
    waited: str


def _waited(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _waiting(row: QueueRow) -> _Waiting:
    return _Waiting(row.handle, row.user, row.model, row.priority, _waited(row.enqueued_at))


def _ledger_filter(request: web.Request, team: Team, current: str) -> dict[str, Any]:
    period = request.query.get("period") or current  # one period at a time: its rows are one index range
    if not PERIOD_KEY.fullmatch(period):
        raise FieldError("period", "'period' must look like 2026-11, 2026-W48, 2026-11-24 or total")
    kind = request.query.get("kind") or None
    if kind is not None and kind not in LEDGER_KINDS:
        raise FieldError("kind", f"'kind' must be one of {', '.join(LEDGER_KINDS)}")
    user = (request.query.get("user") or "").strip()[:200] or None
    before_text = request.query.get("before")
    before = int(before_text) if before_text and before_text.isascii() and before_text.isdigit() \
        and len(before_text) < 19 else None
    return {"period": period, "kind": kind, "user": user, "before": before}


_SETTING_FIELDS = ("budget_usd", "period", "soft_threshold_percent", "user_cap_usd", "max_concurrent_jobs",
                   "max_submits_per_minute", "weight", "on_limit")


@page
async def team_settings(request: web.Request, visit: Visit) -> web.StreamResponse:
    team = await _team(visit, request.match_info["team"])
    _need_admin(visit)
    form = await request.post()
    body: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in _SETTING_FIELDS:
        value = _text(form.get(name))
        if value is None:
            continue
        if name in ("budget_usd", "period", "on_limit"):
            if value:
                body[name] = value
        elif name == "user_cap_usd":
            body[name] = value or None
        elif not value:
            body[name] = None if name not in ("soft_threshold_percent", "weight") else value
        elif value.isascii() and value.isdigit() and len(value) < 10:
            body[name] = int(value)
        else:
            errors[name] = f"'{name}' must be a whole number"
    if not errors:
        try:
            team = await change_team(visit.services, team.name, body)
        except FieldError as error:
            errors[error.field] = error.message
    if errors:
        return await _team_view(request, visit, team, errors=errors, form=dict(form), status=400)
    logger.info("team %s settings changed in the console by %s", team.name, visit.who.user,
                extra={"event": "console.settings", "team": team.name})
    return await _team_view(request, visit, team, notice="Settings saved.")


async def _money(request: web.Request, visit: Visit, kind: str) -> web.StreamResponse:
    team = await _team(visit, request.match_info["team"])
    _need_admin(visit)
    form = await request.post()
    body = {name: value for name in ("amount_usd", "reason", "period") if (value := _text(form.get(name)))}
    try:
        entry = await add_money_entry(visit.services, team, kind, body, visit.who.user)
    except FieldError as error:
        return await _team_view(request, visit, team, errors={f"{kind}_{error.field}": error.message},
                                form={f"{kind}_{name}": value for name, value in body.items()}, status=400)
    shown = entry_json(entry)
    what = "Top-up" if kind == "topup" else "Adjustment"
    amount = shown["credit_delta_usd"] if kind == "topup" else shown["spent_delta_usd"]
    return await _team_view(request, visit, team, notice=f"{what} of ${amount} recorded (ledger entry {entry.id}).")


@page
async def team_topup(request: web.Request, visit: Visit) -> web.StreamResponse:
    return await _money(request, visit, "topup")


@page
async def team_adjust(request: web.Request, visit: Visit) -> web.StreamResponse:
    return await _money(request, visit, "adjust")


@page
async def team_secret(request: web.Request, visit: Visit) -> web.StreamResponse:
    team = await _team(visit, request.match_info["team"])
    _need_admin(visit)
    form = await request.post()
    if form.get("confirm") != team.name:
        return await _team_view(request, visit, team, status=400, errors={
            "confirm": "Type the team's name to confirm: receivers must be given the new secret before they can "
                       "verify webhooks again"})
    secret = await visit.services.store.webhook_secret(team.name, rotate=True)
    logger.warning("webhook secret of team %s rotated by %s in the console", team.name, visit.who.user)
    return await _team_view(request, visit, team, secret=secret, notice="Webhook secret rotated.")


LEDGER_CSV_COLUMNS = ["id", "at", "kind", "team", "user", "handle", "model", "seconds", "resolution", "period",
                      "reserved_delta_usd", "spent_delta_usd", "credit_delta_usd", "saved_usd", "basis", "actor", "note"]
CSV_BATCH = 1000


@page
async def ledger_csv(request: web.Request, visit: Visit) -> web.StreamResponse:
    """Exactly what the team page's ledger filters show, every page of it, streamed a batch at a time."""
    team = await _team(visit, request.match_info["team"])
    found = _ledger_filter(request, team, period_key(team.period, visit.services.clock.now()))
    name = f"ledger-{team.name}-{found['period']}{'-' + found['kind'] if found['kind'] else ''}.csv"
    response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                           "Content-Disposition": f'attachment; filename="{name}"'})
    _headers(response, request)
    before, header = None, True
    while True:
        entries = await visit.services.store.ledger(team.name, found["period"], CSV_BATCH, before, found["kind"],
                                                    found["user"])
        out = io.StringIO()
        write_csv(out, LEDGER_CSV_COLUMNS, (entry_json(entry) for entry in entries), header=header)
        if header:
            await response.prepare(request)
            header = False
        await response.write(out.getvalue().encode())
        if len(entries) < CSV_BATCH:
            break
        before = entries[-1].id
    await response.write_eof()
    return response


# jobs and the gallery
