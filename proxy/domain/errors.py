"""Errors a client can see (the one place that turns them into responses is :mod:`proxy.http.problems`).

Every error answered over HTTP uses the upstream's own shape,
``{"error": "<short title>", "message": "<what went wrong>"}``, so a client
written against Pixazo needs no new error handling.

Hierarchy::

    ProxyError                 any error answered to a client (status, title, message)
    ├── BadRequest             400, a request the gateway will not forward
    │   ├── FieldError         400, about one named field (a form shows it there)
    │   └── ModelNotFound      400, "Model not found", as the upstream says it
    ├── Unauthorized           401, no valid gateway token
    ├── Forbidden              403, a valid token that may not do this
    ├── BudgetExceeded         402, "Insufficient Balance": a cap would be passed
    ├── NotFound               404, unknown handle, or another team's
    ├── Conflict               409, the thing exists, or is still being processed
    ├── PayloadTooLarge        413, body over the configured limit
    ├── UnprocessableContent   422, an Idempotency-Key reused with another body
    ├── TooManyRequests        429, a team's rate or concurrency limit (Retry-After set)
    ├── StoreUnavailable       503, the store cannot take writes now (busy past its wait, or broken)
    ├── UpstreamRefused        the upstream's own 4xx/5xx, passed on with its status
    ├── UpstreamUnavailable    502, upstream unreachable or answered garbage
    └── UpstreamTimeout        504, upstream did not answer in time

The last two say whether the call may have reached the upstream (``indeterminate``):
a submit that was sent and whose answer was lost may have been accepted and billed.
"""

from __future__ import annotations

from collections.abc import Mapping


class ProxyError(Exception):
    """An error with a status code and a message fit to show the client."""

    status: int = 500
    title: str = "Internal Server Error"

    def __init__(
        self,
        message: str,
        *,
        title: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if title is not None:
            self.title = title
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.title, "message": self.message}


class BadRequest(ProxyError):
    status = 400
    title = "Bad Request"


class FieldError(BadRequest):
    """A 400 about one named field of a form or body (the console shows it next to that field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFound(BadRequest):
    title = "Model not found"

    def __init__(self, model_id: str) -> None:
        super().__init__(f"Model '{model_id}' not found or is disabled")


class Unauthorized(ProxyError):
    status = 401
    title = "Unauthorized"


class Forbidden(ProxyError):
    status = 403
    title = "Forbidden"


class BudgetExceeded(ProxyError):
    status = 402
    title = "Insufficient Balance"


class TooManyRequests(ProxyError):
    status = 429
    title = "Too Many Requests"


class StoreUnavailable(ProxyError):
    """The store cannot record anything now; nothing was reserved or sent. Retry later."""

    status = 503
    title = "Service Unavailable"

    def __init__(self, message: str, *, retry_after: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotFound(ProxyError):
    status = 404
    title = "Not Found"


class Conflict(ProxyError):
    status = 409
    title = "Conflict"


class UnprocessableContent(ProxyError):
    status = 422
    title = "Unprocessable Content"


class PayloadTooLarge(ProxyError):
    status = 413
    title = "Payload Too Large"


class UpstreamRefused(ProxyError):
    """The upstream answered an error status; ``status`` is the upstream's."""


class UpstreamUnavailable(ProxyError):
    status = 502
    title = "Bad Gateway"

    def __init__(self, message: str, *, indeterminate: bool = False, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        #: The request may have reached the upstream (sent, answer lost or unreadable); False: provably not sent.
        self.indeterminate = indeterminate


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
    title = "Gateway Timeout"
