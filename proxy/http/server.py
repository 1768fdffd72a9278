"""The HTTP server the gateway runs on: aiohttp's, with even its own low-level errors in the upstream's shape.

A request aiohttp's parser refuses (a request line or header over the limits
``proxy/app.py`` sets, a malformed request) never reaches the application or
its middlewares: aiohttp answers it from :meth:`RequestHandler.handle_error`
in plain text and logs a traceback at ERROR. :class:`GatewayRunner` serves the
application with a request handler that answers those in the upstream's
``{"error", "message"}`` shape instead, logged in one line. :func:`run` is the
``serve`` command's loop (what ``web.run_app`` does, with this runner).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong

logger = logging.getLogger(__name__)


def _problem(status: int, exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return "A request line or header is longer than the gateway accepts"
    if isinstance(exc, BadHttpMethod):
        return "The request method is not valid HTTP"
    if isinstance(exc, BadHttpMessage):
        return "The request is not valid HTTP"
    if status >= 500:
        return "The gateway failed to handle this request"
    return "The request could not be read"


class GatewayRequestHandler(web.RequestHandler):
    __slots__ = ()  # the same layout as aiohttp's, so a handler it built can take this class

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            logger.error("error handling a request", exc_info=exc)
        else:
            logger.info("refused a request aiohttp could not parse: %s", type(exc).__name__ if exc else status,
                        extra={"event": "http.unparsable", "status": status})
        if request.writer.output_size > 0:  # as aiohttp: a response is already on its way, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        response = web.json_response({"error": title, "message": _problem(status, exc)}, status=status)
        response.force_close()
        return response


class GatewayServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        try:
            handler.__class__ = GatewayRequestHandler  # the same object, with this class's handle_error
        except TypeError:  # an aiohttp whose handler layout changed: serve anyway, with its own error pages
            logger.warning("aiohttp's request handler cannot take the gateway's error pages; using its own")
        return handler


class GatewayRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections use :class:`GatewayRequestHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GatewayServer
        return server


def runner_shutdown_timeout(request_seconds: float) -> float:
    """aiohttp's ``shutdown_timeout`` that lets requests in flight take ``request_seconds`` in all at a stop.

    aiohttp (3.14) waits up to its ``shutdown_timeout`` for each handler to finish, then cuts the request's body
    short and waits up to as long again before it cancels the handler's task: twice the setting in the worst case.
    """
    return request_seconds / 2


def run(app: web.Application, *, host: str, port: int, loop: asyncio.AbstractEventLoop,
        request_seconds: float, reuse_port: bool = False) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop accepting, give requests in flight up to
    ``request_seconds`` to finish, and clean up."""
    asyncio.set_event_loop(loop)
    runner = GatewayRunner(app, handle_signals=True, access_log=None,
                           shutdown_timeout=runner_shutdown_timeout(request_seconds))

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()

    try:
        loop.run_until_complete(start())
        loop.run_forever()
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        loop.run_until_complete(runner.cleanup())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
