"""A video's length and size from its URL: a bounded, public-only fetch, parsed by :mod:`proxy.domain.probe`."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from ..domain.probe import MediaInfo, read_media_info
from .guard import check_literal_host, outbound_session

logger = logging.getLogger(__name__)


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
