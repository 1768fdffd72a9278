"""The gateway's own request headers, parsed once, strictly: a header about money is never ignored on a typo."""

from __future__ import annotations

import email.utils
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import BadRequest
from .money import MAX_MICROS, MICROS_PER_USD

DRY_RUN_HEADER = "X-Proxy-Dry-Run"
MAX_COST_HEADER = "X-Max-Cost-USD"
CACHE_HEADER = "X-Proxy-Cache"


def is_dry_run(headers: Any) -> bool:
    """Whether ``X-Proxy-Dry-Run`` asks for a quote; a value that is neither yes nor no is refused."""
    value = headers.get(DRY_RUN_HEADER)
    if value is None:
        return False
    value = value.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise BadRequest(f"{DRY_RUN_HEADER} must be 1, true or yes (or 0, false, no)")


def cost_cap(headers: Any) -> int | None:
    """``X-Max-Cost-USD`` in micro-dollars (rounded down), or None when not sent."""
    value = headers.get(MAX_COST_HEADER)
    if value is None:
        return None
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise BadRequest(f"{MAX_COST_HEADER} must be an amount in USD, e.g. 0.50") from None
    if not amount.is_finite() or amount < 0:
        raise BadRequest(f"{MAX_COST_HEADER} must be an amount of at least 0")
    return min(MAX_MICROS, int((amount * MICROS_PER_USD).to_integral_value(rounding="ROUND_FLOOR")))


def asks_cache_bypass(headers: Any) -> bool:
    """Whether ``X-Proxy-Cache: bypass`` was sent; any other value is refused."""
    value = headers.get(CACHE_HEADER)
    if value is None:
        return False
    if value.strip().lower() != "bypass":
        raise BadRequest(f"{CACHE_HEADER} on a request may only be 'bypass'")
    return True


def retry_after(value: str | None) -> str | None:
    """``Retry-After`` as RFC 9110 allows it (delta-seconds, or an HTTP date, re-written), else None."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return value
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return email.utils.format_datetime(moment, usegmt=True) if moment.tzinfo is not None else None
