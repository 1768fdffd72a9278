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
from pathlib import Path
from typing import BinaryIO

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


#: The first read is tried at this size, then at four times the last, up to ``max_bytes``: a video's header
#: (MP4's moov, Matroska's Info) is usually in its first kilobytes, so most probes read a fraction of the cap.
FIRST_READ_BYTES = 64 * 1024


class MediaProber:
    """Owns a session of its own (never the upstream's, which carries the key), public targets only.

    At most ``concurrency`` probes run at once across the gateway, each asks for no more than ``max_bytes``
    (a ``Range`` request, and the read stops there whatever the server sends) and stops as soon as the
    part read so far can be parsed; what it read is freed when it returns.
    """

    def __init__(self, *, max_bytes: int, timeout: float, allow_private: bool, concurrency: int = 4) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private
        self.session: aiohttp.ClientSession | None = None
        self.slots = asyncio.Semaphore(concurrency)

    async def start(self) -> None:
        self.session = outbound_session(allow_private=self.allow_private, timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def probe(self, url: str) -> MediaInfo | None:
        assert self.session is not None, "prober is not started"
        async with self.slots:
            try:
                return await self._probe(url)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                logger.info("media probe failed: %s", type(exc).__name__)
                return None

    async def _probe(self, url: str) -> MediaInfo | None:
        assert self.session is not None
        check_literal_host(url, allow_private=self.allow_private)
        headers = {"Range": f"bytes=0-{self.max_bytes - 1}"}
        async with self.session.get(url, allow_redirects=False, headers=headers) as response:
            if response.status not in (200, 206):
                logger.info("media probe of a %s URL got HTTP %d", _scheme(url), response.status)
                return None
            data = bytearray()
            next_try = min(FIRST_READ_BYTES, self.max_bytes)
            async for chunk in response.content.iter_chunked(65536):
                data.extend(chunk[: self.max_bytes - len(data)])
                if len(data) >= next_try:
                    info = await asyncio.to_thread(read_media_info, bytes(data))
                    if info is not None or len(data) >= self.max_bytes:
                        return info
                    next_try = min(next_try * 4, self.max_bytes)
        return await asyncio.to_thread(read_media_info, bytes(data))


def _scheme(url: str) -> str:
    return url.split(":", 1)[0]
