"""Local copies of output media (policy ``media.keep_copies``), so cached answers outlive upstream links.

When a job completes, each ``media_url`` is downloaded (at most
``media.max_bytes``), stored under its SHA-256 in ``media.directory``, and the
job's output points at the gateway's ``/media/<sha256>.<ext>`` instead. The
same content is stored once, however many jobs produce it. A download that
fails leaves the upstream's URLs in place (and says so in the log).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .netguard import outbound_session

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[0-9a-f]{64}\.(mp4|webm|mov)$")
EXTENSIONS = {"video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov"}


class MediaStore:
    def __init__(self, directory: Path, *, max_bytes: int, public_url: str, allow_private: bool,
                 timeout: float = 60.0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.public_url = public_url.rstrip("/")
        self.allow_private = allow_private
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.session = outbound_session(allow_private=self.allow_private, timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def keep(self, output: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bytes | None]:
        """``output`` pointing at local copies, and the first file's bytes; unchanged if any download fails."""
        urls = (output or {}).get("media_url")
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            return output, None
        extension = EXTENSIONS.get(str((output or {}).get("media_type")), "mp4")
        local: list[str] = []
        first: bytes | None = None
        for url in urls:
            data = await self._download(url)
            if data is None:
                return output, None
            name = f"{hashlib.sha256(data).hexdigest()}.{extension}"
            await asyncio.to_thread(self._write, name, data)
            local.append(f"{self.public_url}/media/{name}")
            first = data if first is None else first
        return {**(output or {}), "media_url": local}, first

    async def _download(self, url: str) -> bytes | None:
        assert self.session is not None, "media store is not started"
        try:
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    logger.warning("keeping media: upstream answered HTTP %d", response.status)
                    return None
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data.extend(chunk)
                    if len(data) > self.max_bytes:
                        logger.warning("keeping media: output larger than %d bytes; left upstream", self.max_bytes)
                        return None
                return bytes(data)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("keeping media failed: %s", type(exc).__name__)
            return None

    def _write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.part")
        temporary.write_bytes(data)
        temporary.replace(path)

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not NAME.match(name) or not self.path(name).is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(self.path(name), headers={"Cache-Control": "public, max-age=31536000, immutable"})
