"""Reading a video's length and frame size from its URL: a bounded download, then hachoir.

Used to reserve an edit-video job's cost from its input, and to settle a job
whose length or resolution was unknown from its output. Any failure (too
slow, too large to reach the header, not a video, a refused address) gives
``None``; callers then fall back to a policy bound and say so in the ledger.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from dataclasses import dataclass

import aiohttp
from hachoir.core import config as hachoir_config
from hachoir.metadata import extractMetadata
from hachoir.parser import guessParser
from hachoir.stream import InputIOStream

from .netguard import check_literal_host, outbound_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaInfo:
    seconds: int  # whole seconds, rounded up: the unit the upstream prices in
    width: int | None
    height: int | None


def read_media_info(data: bytes) -> MediaInfo | None:
    """What hachoir can tell of ``data``; None when it is not a readable video."""
    hachoir_config.quiet = True  # it otherwise prints parse warnings to the console
    try:
        parser = guessParser(InputIOStream(io.BytesIO(data), source="probe"))
        if parser is None:
            return None
        with parser:
            metadata = extractMetadata(parser)
    except Exception as exc:  # hachoir raises many kinds on odd input; all mean "unreadable"
        logger.debug("media probe could not parse %d bytes: %s", len(data), type(exc).__name__)
        return None
    if metadata is None or not metadata.has("duration"):
        return None
    seconds = metadata.get("duration").total_seconds()
    if not seconds > 0:
        return None
    width = metadata.get("width") if metadata.has("width") else None
    height = metadata.get("height") if metadata.has("height") else None
    return MediaInfo(seconds=math.ceil(seconds - 1e-9), width=width, height=height)


class MediaProber:
    """Owns a session of its own (never the upstream's, which carries the key), public targets only."""

    def __init__(self, *, max_bytes: int, timeout: float, allow_private: bool) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = outbound_session(allow_private=self.allow_private, timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def probe(self, url: str) -> MediaInfo | None:
        assert self.session is not None, "prober is not started"
        try:
            check_literal_host(url, allow_private=self.allow_private)
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    logger.info("media probe of a %s URL got HTTP %d", _scheme(url), response.status)
                    return None
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data.extend(chunk[: self.max_bytes - len(data)])
                    if len(data) >= self.max_bytes:
                        break
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            logger.info("media probe failed: %s", type(exc).__name__)
            return None
        return await asyncio.to_thread(read_media_info, bytes(data))


def _scheme(url: str) -> str:
    return url.split(":", 1)[0]
