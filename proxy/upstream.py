"""The one connection pool to Pixazo. It alone holds the real subscription key.

Every call goes through :meth:`Upstream._call`, which injects the key, applies
timeouts, and turns each way a call can fail into an error of
:mod:`proxy.errors`: the upstream's own 4xx/5xx keep their status and message
(with the key scrubbed out), an unreachable upstream is 502, a slow one 504.
A submit is never retried here: it is not idempotent upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from .config import Secret
from .errors import UpstreamRefused, UpstreamTimeout, UpstreamUnavailable
from .metrics import Metrics, observe_upstream, status_class

logger = logging.getLogger(__name__)

KEY_HEADER = "Ocp-Apim-Subscription-Key"
UPSTREAM_STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "ERROR")
_PASSED_HEADERS = ("Retry-After",)
_MAX_ERROR_TEXT = 500


class Upstream:
    """Client of the Pixazo gateway (or the simulator standing in for it)."""

    def __init__(self, base_url: str, key: Secret, *, timeout: float, connect_timeout: float,
                 metrics: Metrics | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self._key = key
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={KEY_HEADER: self._key.reveal(), "Cache-Control": "no-cache"},
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def submit(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """POST a generate request; the upstream's 202 body (``request_id`` checked)."""
        body = await self._call("submit", "POST", path, json=params)
        if not isinstance(body.get("request_id"), str) or not body["request_id"]:
            raise UpstreamUnavailable("The upstream accepted the request but returned no request_id")
        return body

    async def status(self, upstream_id: str) -> dict[str, Any]:
        """GET the universal status of one upstream request (``status`` checked)."""
        body = await self._call("status", "GET", f"/v2/requests/status/{quote(upstream_id, safe='')}")
        if body.get("status") not in UPSTREAM_STATUSES:
            raise UpstreamUnavailable("The upstream answered a status the gateway does not know")
        return body

    async def _call(self, operation: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        assert self._session is not None, "upstream client is not started"
        url = self.base_url + path
        started = time.perf_counter()
        status: int | None = None
        try:
            async with self._session.request(method, url, **kwargs) as response:
                status = response.status
                text = await response.text(errors="replace")
                if response.status >= 400:
                    kind = "429" if status == 429 else status_class(status)
                    observe_upstream(self.metrics, operation, started, status, kind)
                    raise self._refusal(response, text)
        except asyncio.TimeoutError:
            observe_upstream(self.metrics, operation, started, status, "timeout")
            logger.warning("upstream %s timed out", operation, extra={"event": "upstream.timeout", "path": path})
            raise UpstreamTimeout(
                f"The upstream did not answer within {self._timeout.total:g} seconds"
            ) from None
        except aiohttp.ClientError as exc:
            observe_upstream(self.metrics, operation, started, status, "connect")
            logger.warning("upstream %s failed: %s", operation, type(exc).__name__,
                           extra={"event": "upstream.unreachable", "path": path})
            raise UpstreamUnavailable("The upstream could not be reached") from None
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            observe_upstream(self.metrics, operation, started, status, "malformed")
            logger.warning("upstream %s answered %d with a body that is not a JSON object", operation, status,
                           extra={"event": "upstream.malformed", "path": path, "upstream_status": status})
            raise UpstreamUnavailable("The upstream answered with an unreadable body")
        observe_upstream(self.metrics, operation, started, status, None)
        return body

    def _refusal(self, response: aiohttp.ClientResponse, text: str) -> UpstreamRefused:
        title, message = response.reason or "Upstream Error", ""
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            if isinstance(body.get("error"), str) and body["error"]:
                title = body["error"]
            if isinstance(body.get("message"), str):
                message = body["message"]
        if not message:
            message = f"The upstream answered HTTP {response.status}"
        level = logging.ERROR if response.status in (401, 403) else logging.WARNING
        logger.log(level, "upstream refused %s %s with %d", response.method, response.url.path, response.status,
                   extra={"event": "upstream.refused", "upstream_status": response.status})
        headers = {name: response.headers[name] for name in _PASSED_HEADERS if name in response.headers}
        return UpstreamRefused(
            self.scrub(message)[:_MAX_ERROR_TEXT],
            title=self.scrub(title)[:_MAX_ERROR_TEXT],
            status=response.status,
            headers=headers,
        )

    def scrub(self, text: str) -> str:
        """``text`` with the subscription key blanked out, should the upstream ever echo it."""
        key = self._key.reveal()
        return text.replace(key, "[redacted]") if key else text
