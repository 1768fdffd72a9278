"""Reading a video's length and frame size with hachoir (the bounded download is :mod:`proxy.net.prober`).

Used to reserve an edit-video job's cost from its input, and to settle a job
whose length or resolution was unknown from its output. Any failure (too
slow, too large to reach the header, not a video, a refused address) gives
``None``; callers then fall back to a policy bound and say so in the ledger.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from hachoir.core import config as hachoir_config
from hachoir.metadata import extractMetadata
from hachoir.parser import guessParser
from hachoir.stream import InputIOStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaInfo:
    seconds: int  # whole seconds, rounded up: the unit the upstream prices in
    width: int | None
    height: int | None


class Prober(Protocol):
    """What pricing asks of a prober (:class:`proxy.net.prober.MediaProber` is the one the gateway runs)."""

    async def probe(self, url: str) -> MediaInfo | None: ...


def read_media_info(data: bytes) -> MediaInfo | None:
    """What hachoir can tell of ``data``; None when it is not a readable video."""
    return _read(io.BytesIO(data), len(data))


def read_media_file(path: Path) -> MediaInfo | None:
    """What hachoir can tell of the file at ``path`` (read as it parses, not loaded whole)."""
    try:
        with path.open("rb") as file:
            return _read(file, path.stat().st_size)
    except OSError:
        return None


def _read(file: BinaryIO, size: int) -> MediaInfo | None:
    hachoir_config.quiet = True  # it otherwise prints parse warnings to the console
    try:
        parser = guessParser(InputIOStream(file, source="probe"))
        if parser is None:
            return None
        with parser:
            metadata = extractMetadata(parser)
    except Exception as exc:  # noqa: BLE001 - hachoir raises many kinds on odd input; all mean "unreadable"
        logger.debug("media probe could not parse %d bytes: %s", size, type(exc).__name__)
        return None
    if metadata is None or not metadata.has("duration"):
        return None
    seconds = metadata.get("duration").total_seconds()
    if not seconds > 0:
        return None
    width = metadata.get("width") if metadata.has("width") else None
    height = metadata.get("height") if metadata.has("height") else None
    return MediaInfo(seconds=math.ceil(seconds - 1e-9), width=width, height=height)
