"""The console's jobs list and gallery: every handle a session may see, filtered, newest first."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta
from urllib.parse import urlencode

from aiohttp import web

from ..domain.errors import FieldError, NotFound
from ..store import HandleQuery, JobRow
from .pages import CACHE_RESULTS, PAGE_SIZE, STATUSES, Visit, _render, page


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
