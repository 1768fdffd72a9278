"""HTTP handlers: the upstream's own paths, answered in the upstream's own shapes."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from .errors import ModelNotFound, NotFound
from .metrics import metrics_handler
from .observe import HANDLE, MODEL, TEAM, USER
from .pipeline import SubmitContext
from .services import SERVICES, Services
from .values import ModelSpec
from .views import status_body

logger = logging.getLogger(__name__)

MAX_HANDLE_LENGTH = 200


def submit_handler(model: ModelSpec) -> Any:
    async def submit(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        request[MODEL] = model.id
        return await services.pipeline.run(SubmitContext(request=request, model=model))

    return submit


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
        if not view.terminal:
            return web.json_response(status_body(view))
        answer = services.terminal_answers.remember(view)
    elif answer.team != principal.team and not principal.admin:
        raise NotFound("Request not found")
    request[HANDLE], request[MODEL] = handle, answer.model
    return web.Response(body=answer.body, content_type="application/json", charset="utf-8")


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    checks = {"store": await services.store.ping(), "policies": bool(services.catalog.models)}
    ready = all(checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)


def add_routes(app: web.Application, services: Services) -> None:
    for model in services.catalog.models.values():
        app.router.add_post(model.path, submit_handler(model))
    app.router.add_post("/{model_id}/v1/{tail:.*}", unknown_model)
    app.router.add_get("/v2/requests/status/{request_id}", request_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler(services.metrics))
