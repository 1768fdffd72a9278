"""HTTP handlers: the upstream's own paths, answered in the upstream's own shapes."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from ..domain.errors import ModelNotFound, NotFound
from ..domain.queueing import QUEUE_POSITION_HEADER, QUEUE_WAIT_HEADER, WAITING
from ..domain.values import ModelSpec
from ..domain.views import status_body
from ..ops.metrics import metrics_handler
from ..services import SERVICES, Services
from .observe import HANDLE, MODEL, TEAM, USER, Handler

logger = logging.getLogger(__name__)

MAX_HANDLE_LENGTH = 200


async def unknown_model(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    request[MODEL] = "unknown"
    request[TEAM] = (await services.authenticator.authenticate(request.headers)).team
    raise ModelNotFound(request.match_info["model_id"][:MAX_HANDLE_LENGTH])


async def request_status(request: web.Request) -> web.StreamResponse:
    services: Services = request.app[SERVICES]
    principal = await services.authenticator.authenticate(request.headers)
    request[TEAM], request[USER] = principal.team, principal.user
    handle = request.match_info["request_id"]
    answer = services.terminal_answers.get(handle)
    if answer is None:
        view = await services.store.get_handle(handle) if len(handle) <= MAX_HANDLE_LENGTH else None
        if view is None or (view.team != principal.team and not principal.admin):
            raise NotFound("Request not found")
        request[HANDLE], request[MODEL] = view.handle, view.model
        view = await services.refresher.current(view)
        if view.status == WAITING:
            return web.json_response(status_body(view), headers=await _queue_headers(services, view.job_id))
        if not view.terminal:
            return web.json_response(status_body(view))
        answer = services.terminal_answers.remember(view)
    elif answer.team != principal.team and not principal.admin:
        raise NotFound("Request not found")
    request[HANDLE], request[MODEL] = handle, answer.model
    return web.Response(body=answer.body, content_type="application/json", charset="utf-8")


async def _queue_headers(services: Services, job_id: int) -> dict[str, str]:
    """Where a locally queued job stands: its place in its team's queue and how long it has waited."""
    place = await services.store.queue_place(job_id)
    if place is None:  # it was sent between the two reads
        return {}
    return {QUEUE_POSITION_HEADER: str(place.position), QUEUE_WAIT_HEADER: f"{place.waited_seconds:.1f}"}


async def cancel_request(request: web.Request) -> web.StreamResponse:
    """``DELETE /v2/requests/status/{request_id}``: cancel a job still waiting in the local queue (its owner's
    team, or an admin); its reservation is released at once. One the upstream has is 409."""
    services: Services = request.app[SERVICES]
    principal = await services.authenticator.authenticate(request.headers)
    request[TEAM], request[USER] = principal.team, principal.user
    handle = request.match_info["request_id"]
    view = await services.store.get_handle(handle) if len(handle) <= MAX_HANDLE_LENGTH else None
    if view is None or (view.team != principal.team and not principal.admin):
        raise NotFound("Request not found")
    request[HANDLE], request[MODEL] = view.handle, view.model
    who = f"admin '{principal.user}'" if principal.admin and view.team != principal.team else f"'{principal.user}'"
    await services.store.cancel_waiting(handle, who)
    logger.info("queued %s cancelled by %s", handle, principal.user,
                extra={"event": "queue.cancelled", "handle": handle, "team": view.team})
    services.metrics.child(services.metrics.queue_ended, view.team, "cancelled").inc()
    ended = await services.store.get_handle(handle)
    assert ended is not None
    return web.json_response(status_body(ended))


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    checks = {"store": await services.store.ping(), "policies": bool(services.catalog.models)}
    ready = all(checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)


def add_routes(app: web.Application, services: Services, submit: Callable[[ModelSpec], Handler]) -> None:
    """The upstream's paths; ``submit`` gives each model's submit handler (the pipeline's, from the app)."""
    for model in services.catalog.models.values():
        app.router.add_post(model.path, submit(model))
    app.router.add_post("/{model_id}/v1/{tail:.*}", unknown_model)
    app.router.add_get("/v2/requests/status/{request_id}", request_status)
    app.router.add_delete("/v2/requests/status/{request_id}", cancel_request)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler(services.metrics))
