"""Local copies of output media (policy ``media.keep_copies``), so cached answers outlive upstream links.

When a job completes, each ``media_url`` is downloaded, streamed to disk (at
most ``media.max_bytes`` each, never held in memory), stored under its SHA-256
in ``media.directory``, and the job's output points at the gateway's
``/media/<sha256>.<ext>`` instead. The same content is stored once, however
many jobs produce it. Downloads go only to public addresses (IP literals
included) unless ``PROXY_PROBE_ALLOW_PRIVATE`` is on, follow no redirects, run
at most ``media.concurrency`` at a time, and a job listing more than
``media.max_files_per_job`` URLs is not copied at all. A download that fails
leaves the upstream's URLs in place (and says so in the log).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..net.guard import check_literal_host, outbound_session

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[0-9a-f]{64}\.(mp4|webm|mov)$")
EXTENSIONS = {"video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov"}


class MediaStore:
    def __init__(self, directory: Path, *, max_bytes: int, public_url: str, allow_private: bool,
                 timeout: float = 60.0, max_files_per_job: int = 4, concurrency: int = 2) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.public_url = public_url.rstrip("/")
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_files_per_job = max_files_per_job
        self.slots = asyncio.Semaphore(concurrency)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.session = outbound_session(allow_private=self.allow_private, timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def keep(self, output: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Path | None]:
        """``output`` pointing at local copies, and the first copy's path; unchanged if any download fails."""
        urls = (output or {}).get("media_url")
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            return output, None
        if len(urls) > self.max_files_per_job:
            logger.warning("keeping media: a job lists %d files, more than media.max_files_per_job (%d); left upstream",
                           len(urls), self.max_files_per_job)
            return output, None
        extension = EXTENSIONS.get(str((output or {}).get("media_type")), "mp4")
        local: list[str] = []
        first: Path | None = None
        for url in urls:
            async with self.slots:
                name = await self._download(url, extension)
            if name is None:
                return output, None
            local.append(f"{self.public_url}/media/{name}")
            first = first or self.path(name)
        return {**(output or {}), "media_url": local}, first

    async def _download(self, url: str, extension: str) -> str | None:
        """Stream ``url`` into the store; the stored name, or None (and nothing left behind) if it fails."""
        assert self.session is not None, "media store is not started"
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".download-{os.getpid()}-{secrets.token_hex(8)}.part"
        digest = hashlib.sha256()
        try:
            check_literal_host(url, allow_private=self.allow_private)
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    logger.warning("keeping media: upstream answered HTTP %d", response.status)
                    return None
                size = 0
                with temporary.open("wb") as file:
                    async for chunk in response.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > self.max_bytes:
                            logger.warning("keeping media: output larger than %d bytes; left upstream", self.max_bytes)
                            return None
                        digest.update(chunk)
                        await asyncio.to_thread(file.write, chunk)
            name = f"{digest.hexdigest()}.{extension}"
            await asyncio.to_thread(self._place, temporary, name)
            return name
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            logger.warning("keeping media failed: %s", type(exc).__name__)
            return None
        finally:
            temporary.unlink(missing_ok=True)

    def _place(self, temporary: Path, name: str) -> None:
        path = self.path(name)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.replace(path)

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not NAME.match(name) or not self.path(name).is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(self.path(name), headers={"Cache-Control": "public, max-age=31536000, immutable"})
