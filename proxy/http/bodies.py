"""Reading a request's JSON body: its content type, its size, then :func:`proxy.domain.validate.parse_json`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..domain.errors import BadRequest, PayloadTooLarge
from ..domain.validate import parse_json


def check_content_type(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise BadRequest(f"Content-Type must be application/json, not '{request.content_type or 'none'}'")


async def read_json_body(request: web.Request, max_bytes: int) -> Any:
    """The request's JSON body, refusing a wrong content type, an oversized or non-JSON body."""
    check_content_type(request)
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"The request body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))
