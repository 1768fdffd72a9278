"""The admin HTTP API: teams and budgets, spend, ledger, handles, top-ups and adjustments.

Admin tokens only (``role: "admin"``); any other valid token is 403. Amounts
are exact: send them as JSON strings (``"12.50"``) or numbers, which are read
as decimals, never floats. A limit change takes effect on the next request.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from decimal import Decimal
from typing import Any

from aiohttp import web

from ..domain.budget import PERIOD_KEY, global_key_for, period_key
from ..domain.errors import BadRequest, Conflict, FieldError, Forbidden, NotFound
from ..domain.money import micros_to_usd, usd_to_micros
from ..domain.validate import parse_json
from ..domain.values import Principal
from ..domain.views import status_body
from ..services import SERVICES, Services
from ..store import (
    TEAM_NAME_RULE,
    EntryRefused,
    LedgerEntry,
    SettingProblem,
    SpendRow,
    Team,
    TeamExists,
    UnknownTeam,
    check_team_settings,
    team_name_problem,
)
from .bodies import check_content_type
from .observe import TEAM

logger = logging.getLogger(__name__)

MAX_PAGE = 1000

# request field -> (store setting, parser)
_MONEY_FIELDS = {"budget_usd": "budget_limit_micros", "user_cap_usd": "user_cap_micros"}
_COUNT_FIELDS = {"soft_threshold_percent", "max_concurrent_jobs", "max_submits_per_minute", "weight"}


async def _admin(request: web.Request) -> tuple[Services, Principal]:
    services = request.app[SERVICES]
    principal = await services.authenticator.authenticate(request.headers)
    request[TEAM] = principal.team
    if not principal.admin:
        raise Forbidden("This route needs an admin token")
    return services, principal


async def _body(request: web.Request, services: Services) -> dict[str, Any]:
    check_content_type(request)
    raw = await request.read()  # bounded by the app's client_max_size (413 past it)
    body = parse_json(raw, parse_float=Decimal)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body


def _amount(name: str, value: Any, *, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise FieldError(name, f"'{name}' must be an amount in USD, e.g. \"12.50\"")
    text = str(value).strip()
    negative = signed and text.startswith("-")
    try:
        micros = usd_to_micros(text[1:] if negative else text)
    except ValueError as exc:
        raise FieldError(name, f"'{name}': {exc}") from None
    return -micros if negative else micros


def _settings(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    allowed = set(_MONEY_FIELDS) | _COUNT_FIELDS | {"period", "on_limit"} | ({"name"} if creating else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest("unknown field(s): " + ", ".join(f"'{name}'" for name in unknown))
    settings: dict[str, Any] = {}
    for name, value in body.items():
        if name == "name":
            continue
        setting = _MONEY_FIELDS.get(name, name)
        settings[setting] = _amount(name, value) if name in _MONEY_FIELDS and value is not None else value
    try:
        check_team_settings(settings)  # the same rules the CLI and the store apply
    except SettingProblem as problem:
        field = next((api for api, stored in _MONEY_FIELDS.items() if stored == problem.setting), problem.setting)
        raise FieldError(field, f"'{field}' {problem.rule}") from None
    return settings


async def _team(services: Services, name: str) -> Team:
    team = await services.store.get_team(name)
    if team is None:
        raise NotFound(f"Team '{name[:100]}' not found")
    return team


def _period(request: web.Request, team: Team, services: Services) -> str:
    key = request.query.get("period")
    if key is None:
        key = period_key(team.period, services.clock.now())
    if not PERIOD_KEY.fullmatch(key):
        raise BadRequest("'period' must look like 2026-11, 2026-W48, 2026-11-24 or total")
    return key


_WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is true), within a 64-bit integer


def query_int(request: web.Request, name: str, minimum: int, maximum: int, default: int | None = None) -> int | None:
    """A whole-number query parameter between ``minimum`` and ``maximum``; 400 for anything else."""
    text = request.query.get(name)
    if text is None:
        return default
    if not _WHOLE_NUMBER.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise BadRequest(f"'{name}' must be a whole number between {minimum} and {maximum}")
    return int(text)


def _limit(request: web.Request) -> int:
    limit = query_int(request, "limit", 1, MAX_PAGE, 100)
    assert limit is not None
    return limit


async def team_json(services: Services, team: Team) -> dict[str, Any]:
    key = period_key(team.period, services.clock.now())
    view = await services.store.budget_view(team.name, key)
    return {
        "name": team.name,
        "budget_usd": micros_to_usd(team.budget_limit_micros),
        "period": team.period,
        "soft_threshold_percent": team.soft_threshold_percent,
        "user_cap_usd": micros_to_usd(team.user_cap_micros) if team.user_cap_micros is not None else None,
        "max_concurrent_jobs": team.max_concurrent_jobs,
        "max_submits_per_minute": team.max_submits_per_minute,
        "weight": team.weight,
        "on_limit": team.on_limit,
        "created_at": team.created_at,
        "updated_at": team.updated_at,
        "current": {
            "period": key,
            "limit_usd": micros_to_usd(view.limit_micros),
            "credit_usd": micros_to_usd(view.credit_micros),
            "spent_usd": micros_to_usd(view.spent_micros),
            "reserved_usd": micros_to_usd(view.reserved_micros),
            "remaining_usd": micros_to_usd(view.remaining_micros),
        },
    }


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "at": entry.at, "kind": entry.kind, "team": entry.team, "user": entry.user,
        "handle": entry.handle, "model": entry.model, "seconds": entry.seconds, "resolution": entry.resolution,
        "period": entry.period_key, "reserved_delta_usd": micros_to_usd(entry.reserved_delta),
        "spent_delta_usd": micros_to_usd(entry.spent_delta), "credit_delta_usd": micros_to_usd(entry.credit_delta),
        "saved_usd": micros_to_usd(entry.saved_micros), "basis": entry.basis, "actor": entry.actor, "note": entry.note,
    }


async def list_teams(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    return web.json_response([await team_json(services, team) for team in await services.store.list_teams()])


async def create_team(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    body = await _body(request, services)
    name = body.get("name")
    if not isinstance(name, str) or team_name_problem(name) is not None:
        raise BadRequest(f"'name' must be {TEAM_NAME_RULE}")
    if "budget_usd" not in body:
        raise BadRequest("'budget_usd' is required")
    settings = _settings(body, creating=True)
    settings.setdefault("soft_threshold_percent", services.rules.soft_threshold_percent)
    limit = settings.pop("budget_limit_micros")
    try:
        team = await services.store.create_team(name, limit, settings.pop("period", "month"), **settings)
    except TeamExists:
        raise Conflict(f"Team '{name}' already exists") from None
    return web.json_response(await team_json(services, team), status=201)


async def show_team(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    return web.json_response(await team_json(services, await _team(services, request.match_info["team"])))


async def update_team(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    team = await change_team(services, request.match_info["team"], await _body(request, services))
    return web.json_response(await team_json(services, team))


async def change_team(services: Services, name: str, body: dict[str, Any]) -> Team:
    """Change a team's settings (the API's field names, values as the API takes them); the team as it now is.

    The one path every surface that edits a team goes through (this API's PATCH, the console's form)."""
    settings = _settings(body, creating=False)
    try:
        return await services.store.update_team(name, **settings)
    except UnknownTeam:
        raise NotFound(f"Team '{name[:100]}' not found") from None


async def team_spend(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    team = await _team(services, request.match_info["team"])
    [row] = await services.store.spend_report({team.name: _period(request, team, services)})
    return web.json_response(report_json(row))


async def spend(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    teams = await services.store.list_teams()
    keys = {team.name: _period(request, team, services) for team in teams}
    return web.json_response([report_json(row) for row in await services.store.spend_report(keys)])


def report_json(row: SpendRow) -> dict[str, Any]:
    return {name.removesuffix("_micros") + "_usd" if name.endswith("_micros") else name:
            micros_to_usd(value) if name.endswith("_micros") else value for name, value in asdict(row).items()}


async def team_ledger(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    team = await _team(services, request.match_info["team"])
    period = request.query.get("period")
    if period is not None and not PERIOD_KEY.fullmatch(period):
        raise BadRequest("'period' must look like 2026-11, 2026-W48, 2026-11-24 or total")
    before = query_int(request, "before", 1, 2**63 - 1)
    entries = await services.store.ledger(team.name, period, _limit(request), before)
    return web.json_response([entry_json(entry) for entry in entries])


async def team_requests(request: web.Request) -> web.StreamResponse:
    services, _ = await _admin(request)
    team = await _team(services, request.match_info["team"])
    views = await services.store.handles_of(team.name, _limit(request), request.query.get("before"))
    return web.json_response([status_body(view) | {"user": view.user} for view in views])


async def webhook_secret(request: web.Request) -> web.StreamResponse:
    """GET: the team's webhook signing secret (created on first use); POST: rotate it."""
    services, principal = await _admin(request)
    team = await _team(services, request.match_info["team"])
    rotate = request.method == "POST"
    secret = await services.store.webhook_secret(team.name, rotate=rotate)
    if rotate:
        logger.warning("webhook secret of team %s rotated by %s", team.name, principal.user)
    return web.json_response({"team": team.name, "secret": secret}, status=201 if rotate else 200)


async def _money_entry(request: web.Request, kind: str) -> web.StreamResponse:
    services, principal = await _admin(request)
    team = await _team(services, request.match_info["team"])
    entry = await add_money_entry(services, team, kind, await _body(request, services), principal.user)
    return web.json_response(entry_json(entry), status=201)


async def add_money_entry(services: Services, team: Team, kind: str, body: dict[str, Any], actor: str) -> LedgerEntry:
    """A top-up or an adjustment of ``team`` by ``actor``, checked as the API checks it (``amount_usd``,
    ``reason``, optional ``period``); the ledger entry it wrote. The console's forms come through here too."""
    unknown = sorted(set(body) - {"amount_usd", "reason", "period"})
    if unknown:
        raise BadRequest("unknown field(s): " + ", ".join(f"'{name}'" for name in unknown))
    if "amount_usd" not in body:
        raise FieldError("amount_usd", "'amount_usd' is required")
    amount = _amount("amount_usd", body["amount_usd"], signed=kind == "adjust")
    if kind == "topup" and amount <= 0:
        raise FieldError("amount_usd", "'amount_usd' of a top-up must be more than 0")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise FieldError("reason", "'reason' is required: say why, in at most 500 characters")
    now = services.clock.now()
    key = body.get("period") or period_key(team.period, now)
    if not isinstance(key, str):
        raise FieldError("period", "'period' must be a period key like 2026-11, 2026-W48, 2026-11-24 or total")
    try:
        global_key = global_key_for(team.period, key, services.rules.global_period, now)
    except ValueError as exc:
        raise FieldError("period", f"'period': {exc}; team '{team.name}' has a {team.period} budget") from None
    try:
        return await services.store.add_entry(team.name, kind, amount, key, global_key, actor, reason.strip())
    except EntryRefused as exc:
        raise FieldError("amount_usd", str(exc)) from None


async def topup(request: web.Request) -> web.StreamResponse:
    return await _money_entry(request, "topup")


async def adjust(request: web.Request) -> web.StreamResponse:
    return await _money_entry(request, "adjust")


ADMIN_ROUTES = [
    ("GET", "/admin/teams", list_teams),
    ("POST", "/admin/teams", create_team),
    ("GET", "/admin/teams/{team}", show_team),
    ("PATCH", "/admin/teams/{team}", update_team),
    ("GET", "/admin/teams/{team}/spend", team_spend),
    ("GET", "/admin/teams/{team}/ledger", team_ledger),
    ("GET", "/admin/teams/{team}/requests", team_requests),
    ("POST", "/admin/teams/{team}/topups", topup),
    ("POST", "/admin/teams/{team}/adjustments", adjust),
    ("GET", "/admin/spend", spend),
    ("GET", "/admin/teams/{team}/webhook-secret", webhook_secret),
    ("POST", "/admin/teams/{team}/webhook-secret", webhook_secret),
]


def add_admin_routes(app: web.Application) -> None:
    for method, path, handler in ADMIN_ROUTES:
        app.router.add_route(method, path, handler)
