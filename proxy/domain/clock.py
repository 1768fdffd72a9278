"""Time as the upstream writes it, and time-ordered ids like the upstream's."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime


class Clock:
    """Where the gateway reads the time for budget periods; tests substitute a clock they can move."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def iso_utc(moment: datetime | None = None) -> str:
    """``2026-03-31T10:00:00.000Z``: the upstream's timestamp form (isoformat is C; strftime cost ~4x as much)."""
    moment = datetime.now(UTC) if moment is None else moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:23] + "Z"


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7), the form the upstream's ids use."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def new_request_id(model_id: str) -> str:
    """``<model-id>_<uuid7>``, the upstream's request id form."""
    return f"{model_id}_{uuid7()}"
