"""The console's pages and forms: overview, team, jobs, gallery, sign-in.

Every handler runs behind :func:`page`, which finds the session (or sends the person to sign in), renders
a refusal as a page in words instead of the API's JSON, and sets the security headers. A non-admin session
sees only its own team, read-only; another team's pages and data are 404, exactly as a team that does not
exist. Every form that changes anything carries the session's CSRF token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from ..domain.budget import period_key
from ..domain.clock import iso_utc
from ..domain.errors import Forbidden, NotFound, ProxyError, Unauthorized
from ..domain.money import micros_to_usd
from ..domain.views import TERMINAL_STATUSES
from ..services import SERVICES, Services
from ..store import ConsoleIdentity, ConsoleSession, SpendRow, Team
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
