"""The console's pages and forms: overview, team, jobs, gallery, sign-in.

Every handler runs behind :func:`page`, which finds the session (or sends the person to sign in), renders
a refusal as a page in words instead of the API's JSON, and sets the security headers. A non-admin session
sees only its own team, read-only; another team's pages and data are 404, exactly as a team that does not
exist. Every form that changes anything carries the session's CSRF token.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from ..domain.budget import PERIOD_KEY, period_key, period_start
from ..domain.clock import iso_utc
from ..domain.errors import FieldError, Forbidden, NotFound, ProxyError, Unauthorized
from ..domain.money import micros_to_usd
from ..domain.tabular import write_csv
from ..domain.views import TERMINAL_STATUSES
from ..http.admin import add_money_entry, change_team, entry_json
from ..services import SERVICES, Services
from ..store import ConsoleIdentity, ConsoleSession, DaySpend, HandleQuery, JobRow, QueueRow, SpendRow, Team
from ..store.sqlstore import LEDGER_KINDS
from .signin import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    csrf_matches,
    digest,
    new_form_nonce,
    session_of,
    start_session,
    well_formed,
)

logger = logging.getLogger(__name__)

SESSION = web.AppKey("console_session_seconds", float)
SECURE = web.AppKey("console_secure_cookies", bool)
MEDIA_ORIGINS = web.AppKey("console_media_origins", str)
#: What a page may load: only the gateway's own scripts and styles, no inline script or style, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "media-src 'self' {media}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_SIZE = 50
STATUSES = ("QUEUED", "PROCESSING", "INDETERMINATE", *TERMINAL_STATUSES)
CACHE_RESULTS = ("MISS", "HIT", "COALESCED", "BYPASS")
SORTS = ("name", "used", "remaining", "spent")
_DAY = "%Y-%m-%d"

Handler = Callable[[web.Request, "Visit"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Visit:
    """Who is looking, through which session."""

    services: Services
    session: ConsoleSession

    @property
    def who(self) -> ConsoleIdentity:
        return self.session.identity

    def may_see(self, team: str) -> bool:
        return self.who.admin or self.who.team == team


def _headers(response: web.StreamResponse, request: web.Request) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP.format(media=request.app[MEDIA_ORIGINS])
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _problem(request: web.Request, error: ProxyError) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("problem.html", request, {"error": error, "visit": None},
                                              status=error.status)
    return _headers(response, request)


def page(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A console handler: needs a live session (else to the sign-in page); errors as pages, in words."""

    async def run(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        try:
            session = await session_of(services.store, request.cookies.get(SESSION_COOKIE))
            if session is None:
                raise web.HTTPSeeOther("/console/login")
            if request.method == "POST":
                form = await request.post()
                if not csrf_matches(session.csrf, _text(form.get("csrf"))):
                    raise Forbidden("This form has expired or did not come from the console: reload the page "
                                    "and send it again")
            return _headers(await handler(request, Visit(services, session)), request)
        except ProxyError as error:
            return _problem(request, error)

    return run


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) else None


def _render(request: web.Request, template: str, visit: Visit | None, status: int = 200,
            **context: Any) -> web.StreamResponse:
    return aiohttp_jinja2.render_template(template, request, {"visit": visit, **context}, status=status)


async def _team(visit: Visit, name: str) -> Team:
    team = await visit.services.store.get_team(name) if visit.may_see(name) else None
    if team is None:  # another team's, or none: the same answer
        raise NotFound(f"Team '{name[:100]}' not found")
    return team


def _need_admin(visit: Visit) -> None:
    if not visit.who.admin:
        raise Forbidden("Only an admin session can change a team; yours can read its own team")


def usd(micros: int | None) -> str:
    return "" if micros is None else "$" + micros_to_usd(micros)


def when(stamp: str | None) -> str:
    """``2026-12-01T19:24:09.969Z`` -> ``2026-12-01 19:24:09`` (UTC, as stored)."""
    return "" if not stamp else stamp[:19].replace("T", " ")


def short_model(model: str) -> str:
    """The catalog's model id without the family prefix every one of them shares."""
    return model.removeprefix("grok-imagine-video-") or model


# signing in and out


async def login(request: web.Request) -> web.StreamResponse:
    """GET with ``?token=``: redeem a one-time link. Otherwise the form for pasting a gateway token."""
    services = request.app[SERVICES]
    try:
        token = request.query.get("token")
        if token is not None:
            identity = (await services.store.redeem_console_link(digest(token), iso_utc())
                        if well_formed(token) else None)
            if identity is None:
                raise Unauthorized("This sign-in link is not valid: it was used already, it expired, or it was "
                                   "never issued. Ask for a new one (pixazo-proxy console link).")
            return await _signed_in(request, identity)
        if request.method == "POST":
            return await _login_with_token(request)
        return _login_form(request)
    except ProxyError as error:
        if error.status in (400, 401, 403):
            return _login_form(request, error=error.message, status=error.status)
        return _problem(request, error)


def _login_form(request: web.Request, error: str | None = None, status: int = 200) -> web.StreamResponse:
    nonce = new_form_nonce()
    response = _render(request, "login.html", None, status=status, nonce=nonce, error=error)
    response.set_cookie(LOGIN_COOKIE, nonce, path="/console/login", httponly=True, samesite="Strict",
                        secure=request.app[SECURE], max_age=3600)
    return _headers(response, request)


async def _login_with_token(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    form = await request.post()
    if not csrf_matches(request.cookies.get(LOGIN_COOKIE, ""), _text(form.get("nonce"))) \
            or not request.cookies.get(LOGIN_COOKIE):
        raise Forbidden("This sign-in form has expired: reload the page and paste the token again")
    token = _text(form.get("token")) or ""
    caller = await services.authenticator.identify({"Authorization": f"Bearer {token}"} if token else {})
    principal = caller.principal
    expires = (await services.authenticator.verify(token)).get("exp")  # verified just now: from its cache
    left = float(expires) - time.time() if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None
    return await _signed_in(request, ConsoleIdentity(principal.team, principal.user, principal.admin), left)


async def _signed_in(request: web.Request, identity: ConsoleIdentity,
                     token_left: float | None = None) -> web.StreamResponse:
    """Start a session; one begun with a pasted token ends when the token does, if that is sooner."""
    seconds = request.app[SESSION] if token_left is None else max(1.0, min(request.app[SESSION], token_left))
    cookie, _ = await start_session(request.app[SERVICES].store, identity, seconds)
    response = _see_other("/console/")
    response.set_cookie(SESSION_COOKIE, cookie, path="/console/", httponly=True, samesite="Strict",
                        secure=request.app[SECURE], max_age=int(seconds))
    response.del_cookie(LOGIN_COOKIE, path="/console/login")
    logger.info("console sign-in: %s of team %s%s", identity.user, identity.team, " (admin)" if identity.admin else "",
                extra={"event": "console.sign_in", "team": identity.team})
    return _headers(response, request)


@page
async def logout(request: web.Request, visit: Visit) -> web.StreamResponse:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    await visit.services.store.end_console_session(digest(cookie))
    response = _see_other("/console/login")
    response.del_cookie(SESSION_COOKIE, path="/console/")
    return response


# the overview


@page
async def overview(request: web.Request, visit: Visit) -> web.StreamResponse:
    services = visit.services
    now = services.clock.now()
    teams = [team for team in await services.store.list_teams() if visit.may_see(team.name)]
    by_name = {team.name: team for team in teams}
    report = await services.store.spend_report({team.name: period_key(team.period, now) for team in teams})
    query = (request.query.get("q") or "").strip()[:100]
    sort = request.query.get("sort", "name")
    sort = sort if sort in SORTS else "name"
    descending = request.query.get("dir") == "desc"
    rows = [_team_row(by_name[line.team], line) for line in report
            if not query or query.lower() in line.team.lower()]
    keys: dict[str, Callable[[TeamRow], Any]] = {
        "name": lambda row: row.team.name, "used": lambda row: row.used_tenths,
        "remaining": lambda row: row.line.remaining_micros, "spent": lambda row: row.line.spent_micros}
    rows.sort(key=keys[sort], reverse=descending)
    global_line = None
    if services.rules.global_limit_micros is not None:
        key = period_key(services.rules.global_period, now)
        totals = await services.store.global_totals(key)
        global_line = {"period": key, "limit": services.rules.global_limit_micros, "totals": totals}
    template = "_teams.html" if request.headers.get("HX-Target") == "teams" else "overview.html"
    return _render(request, template, visit, rows=rows, q=query, sort=sort, descending=descending,
                   global_line=global_line, sort_link=lambda column: _sort_link(query, sort, descending, column))


@dataclass(frozen=True)
class TeamRow:
    """A line of the overview: the team, its period's figures, and the bar's geometry in tenths of a percent."""

    team: Team
    line: SpendRow
    used_tenths: int
    spent_tenths: int
    reserved_tenths: int

    @property
    def used_percent(self) -> str:
        return f"{self.used_tenths // 10}.{self.used_tenths % 10}"


def _tenths(part: int, whole: int) -> int:
    """``part`` of ``whole`` in tenths of a percent, exactly (integers: these are money figures)."""
    if whole <= 0:
        return 1000 if part > 0 else 0
    return max(0, part * 1000 // whole)


def _team_row(team: Team, line: SpendRow) -> TeamRow:
    allowance = line.limit_micros + line.credit_micros
    spent = min(1000, _tenths(line.spent_micros, allowance))
    return TeamRow(team, line, _tenths(line.spent_micros + line.reserved_micros, allowance), spent,
                   min(1000 - spent, _tenths(line.reserved_micros, allowance)))


def _sort_link(query: str, sort: str, descending: bool, column: str) -> str:
    flip = "asc" if sort == column and descending else ("desc" if sort == column else "asc")
    return "?" + urlencode({k: v for k, v in (("q", query), ("sort", column), ("dir", flip)) if v})


# a team


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


def _handle_query(request: web.Request, visit: Visit) -> tuple[HandleQuery, dict[str, str]]:
    chosen: dict[str, str] = {}
    for name, allowed in (("team", None), ("user", None), ("model", None), ("status", STATUSES),
                          ("cache", CACHE_RESULTS), ("since", None), ("until", None)):
        value = (request.query.get(name) or "").strip()[:200]
        if not value:
            continue
        if allowed is not None and value not in allowed:
            raise FieldError(name, f"'{name}' must be one of {', '.join(allowed)}")
        if name in ("since", "until"):
            try:
                day = date.fromisoformat(value)
            except ValueError:
                raise FieldError(name, f"'{name}' must be a date like 2026-11-24") from None
            value = day.isoformat()
        chosen[name] = value
    if not visit.who.admin:
        if chosen.get("team", visit.who.team) != visit.who.team:
            raise NotFound(f"Team '{chosen['team'][:100]}' not found")
        chosen["team"] = visit.who.team
    until = chosen.get("until")
    query = HandleQuery(team=chosen.get("team"), user=chosen.get("user"), model=chosen.get("model"),
                        status=chosen.get("status"), cache=chosen.get("cache"), since=chosen.get("since"),
                        until=(date.fromisoformat(until) + timedelta(days=1)).isoformat() if until else None)
    before = request.query.get("before", "")
    at, _, handle = before.partition("|")
    if at and handle:
        query = replace(query, before=(at[:40], handle[:300]))
    return query, chosen


def _next(rows: list[JobRow], chosen: dict[str, str]) -> str | None:
    if len(rows) <= PAGE_SIZE:
        return None
    last = rows[PAGE_SIZE - 1]
    return "?" + urlencode({**chosen, "before": f"{last.created_at}|{last.handle}"})


@page
async def jobs(request: web.Request, visit: Visit) -> web.StreamResponse:
    query, chosen = _handle_query(request, visit)
    rows = await visit.services.store.find_handles(query, PAGE_SIZE + 1)
    return _render(request, "jobs.html", visit, rows=rows[:PAGE_SIZE], chosen=chosen, next_page=_next(rows, chosen),
                   teams=await _team_names(visit), models=sorted(visit.services.catalog.models), statuses=STATUSES,
                   caches=CACHE_RESULTS)


async def _team_names(visit: Visit) -> list[str]:
    return [team.name for team in await visit.services.store.list_teams()] if visit.who.admin else [visit.who.team]


@page
async def gallery(request: web.Request, visit: Visit) -> web.StreamResponse:
    query, chosen = _handle_query(request, visit)
    rows = await visit.services.store.find_handles(replace(query, status="COMPLETED"), PAGE_SIZE + 1)
    tiles = [(row, url) for row in rows[:PAGE_SIZE] if (url := _first_media(row)) is not None]
    return _render(request, "gallery.html", visit, tiles=tiles, chosen=chosen, next_page=_next(rows, chosen),
                   teams=await _team_names(visit))


def _first_media(row: JobRow) -> str | None:
    urls = (row.output or {}).get("media_url")
    first = urls[0] if isinstance(urls, list) and urls else None
    return first if isinstance(first, str) and first.startswith(("http://", "https://", "/")) else None

