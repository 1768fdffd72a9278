"""The outermost middleware: request metrics and one structured access line per request.

The access line is the request's whole story (route, status, duration, team,
user, model, handle, cache), so handlers do not log their own line on success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..ops.metrics import Metrics, upstream_seconds
from ..ops.stopping import InFlight

access_logger = logging.getLogger("proxy.access")

#: What handlers tell this middleware about the request they answered (all bounded values).
TEAM = web.RequestKey("team", str)
USER = web.RequestKey("user", str)
MODEL = web.RequestKey("model", str)
HANDLE = web.RequestKey("handle", str)
CACHE = web.RequestKey("cache", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def observe_middleware(metrics: Metrics, in_flight: InFlight) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        with in_flight.track():
            return await _observed(metrics, request, handler)

    return observe


async def _observed(metrics: Metrics, request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    spent: list[float] = []
    token = upstream_seconds.set(spent)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        upstream_seconds.reset(token)
        elapsed = time.perf_counter() - started
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        team = request.get(TEAM, "")
        metrics.request_answered(route, request.get(MODEL, ""), team, status, elapsed, sum(spent))
        access_logger.info(
            "%s %s %d", request.method, route, status,
            extra={"event": "http.request", "method": request.method, "route": route, "status": status,
                   "duration_ms": round(elapsed * 1000, 3), "team": team or None, "user": request.get(USER),
                   "model": request.get(MODEL) or None, "handle": request.get(HANDLE), "cache": request.get(CACHE)},
        )
