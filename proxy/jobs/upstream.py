"""The one connection pool to Pixazo. It alone holds the real subscription key.

Every call goes through :meth:`Upstream._call`, which injects the key, applies
timeouts, and turns each way a call can fail into an error of
:mod:`proxy.errors`: the upstream's own 4xx/5xx keep their status and message
(with the key scrubbed out), an unreachable upstream is 502, a slow one 504.
A submit is never retried here: it is not idempotent upstream. A failed call
says whether it may have reached the upstream (``indeterminate``): only a
connection that was never made (refused, DNS failure, connect timeout) is
provably unsent; a timeout or reset after sending, or a 2xx answer the
gateway cannot read, may hide a job the upstream accepted.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from ..config import Secret
from ..domain.errors import UpstreamRefused, UpstreamTimeout, UpstreamUnavailable
from ..domain.headers import retry_after
from ..domain.redact import Redactor
from ..ops.metrics import Metrics, observe_upstream, status_class

logger = logging.getLogger(__name__)

KEY_HEADER = "Ocp-Apim-Subscription-Key"
UPSTREAM_STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "ERROR")
_MAX_ERROR_TEXT = 500
#: An upstream request id the gateway will store and put in a path: the documented ``<model-id>_<uuid>`` fits.
UPSTREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")


def media_urls(output: dict[str, Any]) -> dict[str, Any]:
    """``output`` with ``media_url`` as the documented list of strings (a lone string becomes a list of one)."""
    urls = output.get("media_url")
    if urls is None:
        return output
    if isinstance(urls, str):
        return {**output, "media_url": [urls]}
    if isinstance(urls, list) and all(isinstance(url, str) for url in urls):
        return output
    raise UpstreamUnavailable("The upstream answered a media_url that is not a list of URLs")


class Upstream:
    """Client of the Pixazo gateway (or the simulator standing in for it)."""

    def __init__(self, base_url: str, key: Secret, *, timeout: float, connect_timeout: float,
                 metrics: Metrics | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self._key = key
        self._redactor = Redactor(key.reveal())
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

    @property
    def timeout_seconds(self) -> float:
        """The longest one call may take."""
        return float(self._timeout.total or 0.0)

    async def submit(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """POST a generate request; the upstream's 202 body (``request_id`` checked)."""
        body = await self._call("submit", "POST", path, json=params)
        upstream_id = body.get("request_id")
        if not isinstance(upstream_id, str) or not UPSTREAM_ID.fullmatch(upstream_id):
            raise UpstreamUnavailable("The upstream accepted the request but returned no usable request_id",
                                      indeterminate=True)
        return body

    async def status(self, upstream_id: str) -> dict[str, Any]:
        """GET the universal status of one upstream request (``status`` and ``output.media_url`` checked)."""
        if not UPSTREAM_ID.fullmatch(upstream_id):
            raise UpstreamUnavailable("The stored upstream request id is not one the gateway can ask about")
        body = await self._call("status", "GET", f"/v2/requests/status/{quote(upstream_id, safe='')}")
        if body.get("status") not in UPSTREAM_STATUSES:
            raise UpstreamUnavailable("The upstream answered a status the gateway does not know")
        if isinstance(body.get("output"), dict):
            body["output"] = media_urls(body["output"])
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
        except aiohttp.ConnectionTimeoutError:
            observe_upstream(self.metrics, operation, started, status, "timeout")
            logger.warning("upstream %s: no connection within %gs", operation, self._timeout.connect or 0,
                           extra={"event": "upstream.unreachable", "path": path})
            raise UpstreamTimeout("The upstream could not be reached in time") from None
        except TimeoutError:
            observe_upstream(self.metrics, operation, started, status, "timeout")
            logger.warning("upstream %s timed out", operation, extra={"event": "upstream.timeout", "path": path})
            raise UpstreamTimeout(
                f"The upstream did not answer within {self._timeout.total:g} seconds", indeterminate=True
            ) from None
        except aiohttp.ClientConnectorError as exc:
            observe_upstream(self.metrics, operation, started, status, "connect")
            logger.warning("upstream %s failed: %s", operation, type(exc).__name__,
                           extra={"event": "upstream.unreachable", "path": path})
            raise UpstreamUnavailable("The upstream could not be reached") from None
        except aiohttp.ClientError as exc:  # connected, then reset or cut off: the request may have arrived
            observe_upstream(self.metrics, operation, started, status, "connect")
            logger.warning("upstream %s failed after connecting: %s", operation, type(exc).__name__,
                           extra={"event": "upstream.unreachable", "path": path})
            raise UpstreamUnavailable("The upstream connection failed before it answered", indeterminate=True) from None
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            observe_upstream(self.metrics, operation, started, status, "malformed")
            logger.warning("upstream %s answered %d with a body that is not a JSON object", operation, status,
                           extra={"event": "upstream.malformed", "path": path, "upstream_status": status})
            raise UpstreamUnavailable("The upstream answered with an unreadable body", indeterminate=True)
        observe_upstream(self.metrics, operation, started, status, None)
        return self._redactor.value(body)  # nothing the upstream says is stored, answered or delivered unscrubbed

    def _refusal(self, response: aiohttp.ClientResponse, text: str) -> UpstreamRefused:
        title, message = response.reason or "Upstream Error", ""
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
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
        wait = retry_after(response.headers.get("Retry-After"))
        headers = {"Retry-After": wait} if wait is not None else {}
        return UpstreamRefused(
            self.scrub(message)[:_MAX_ERROR_TEXT],
            title=self.scrub(title)[:_MAX_ERROR_TEXT],
            status=response.status,
            headers=headers,
        )

    def scrub(self, text: str) -> str:
        """``text`` with the subscription key, or any piece of it of 8 characters or more, blanked out."""
        return self._redactor.text(text)


def initial_status(upstream_body: dict[str, Any]) -> str:
    """The status a job starts in, from the upstream's answer to its submit (QUEUED unless it says PROCESSING)."""
    status = upstream_body.get("status")
    return status if status in ("QUEUED", "PROCESSING") else "QUEUED"
