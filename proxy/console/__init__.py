"""The console at ``/console/``: budget administration, spend charts, jobs and their videos, for people.

Server-rendered (Jinja2 through aiohttp-jinja2), htmx for in-place updates and uPlot for the charts, both
vendored under ``static/vendor`` (no CDN, no build step); every page works with JavaScript off but for the
charts. :func:`add_console` is called once, by the composition root.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import jobs, pages, teams

HERE = Path(__file__).parent


def add_console(app: web.Application, *, session_seconds: float, public_url: str, upstream_url: str) -> None:
    """Mount the console on ``app``. Cookies are ``Secure`` when ``public_url`` is https; videos may play from
    the gateway itself, any https origin, and the upstream's own origin (where its output links point)."""
    environment = aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, app_key=aiohttp_jinja2.APP_KEY)
    environment.filters["usd"] = pages.usd
    environment.filters["when"] = pages.when
    environment.filters["model"] = pages.short_model
    environment.globals["static"] = lambda name: f"/console/static/{name}"
    app[pages.SESSION] = session_seconds
    app[pages.SECURE] = public_url.startswith("https://")
    upstream = urlsplit(upstream_url)
    app[pages.MEDIA_ORIGINS] = " ".join(
        ["https:"] + ([f"{upstream.scheme}://{upstream.netloc}"] if upstream.scheme == "http" else []))
    for method, path, handler in (
        ("GET", "/console/", pages.overview),
        ("GET", "/console/login", pages.login),
        ("POST", "/console/login", pages.login),
        ("POST", "/console/logout", pages.logout),
        ("GET", "/console/teams/{team}", teams.team_page),
        ("POST", "/console/teams/{team}/settings", teams.team_settings),
        ("POST", "/console/teams/{team}/topups", teams.team_topup),
        ("POST", "/console/teams/{team}/adjustments", teams.team_adjust),
        ("POST", "/console/teams/{team}/webhook-secret", teams.team_secret),
        ("GET", "/console/teams/{team}/ledger.csv", teams.ledger_csv),
        ("GET", "/console/jobs", jobs.jobs),
        ("GET", "/console/gallery", jobs.gallery),
    ):
        app.router.add_route(method, path, handler)
    app.router.add_get("/console", _to_console)
    app.router.add_static("/console/static/", HERE / "static", append_version=False)


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/console/")
