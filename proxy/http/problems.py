"""The one place that turns errors into responses: the upstream's shape, ``{"error": ..., "message": ...}``."""

from __future__ import annotations

import logging

from aiohttp import web

from ..domain.errors import ProxyError
from .observe import Handler

logger = logging.getLogger(__name__)


def error_response(error: ProxyError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


_HTTP_TITLES = {
    404: ("Not Found", "No such route"),
    405: ("Method Not Allowed", "Method not allowed on this route"),
    413: ("Payload Too Large", "Request body is larger than the configured limit"),
}



@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to the upstream's error shape; never leak a traceback."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title, message = _HTTP_TITLES.get(exc.status, (exc.reason, exc.reason))
        error = ProxyError(message, title=title, status=exc.status)
        if exc.status == 405:
            error.headers["Allow"] = exc.headers.get("Allow", "")
        return error_response(error)
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ProxyError("The gateway failed to handle this request"))
