"""Outbound calls to URLs that clients chose: only to public addresses.

The gateway fetches client-supplied URLs (an input video to probe its
length; later, webhook targets). Without a guard a client could make it reach
loopback, the private network or a cloud metadata service. The check is made
on the addresses a name resolves to, by the resolver the connection itself
uses, so a name that resolves differently the second time (DNS rebinding) is
caught at connect time too.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class BlockedAddress(aiohttp.ClientConnectionError):
    """A URL's host is, or resolves to, an address that is not public."""


def is_public_address(text: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local, CGNAT, multicast..."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return is_public_address(str(mapped))
    return address.is_global and not address.is_multicast


def literal_address(host: str) -> str | None:
    """The host as an IP address if it is one (brackets stripped), else None."""
    candidate = host.strip("[]")
    try:
        return str(ipaddress.ip_address(candidate.split("%", 1)[0]))
    except ValueError:
        return None


class PublicOnlyResolver(AbstractResolver):
    """Resolves names as usual, refusing any name with a non-public address among its answers."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_public_address(result["host"]):
                raise BlockedAddress(f"{host} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


def outbound_session(*, allow_private: bool, timeout: float, **kwargs: Any) -> aiohttp.ClientSession:
    """A session for client-chosen URLs: no upstream key, no redirects by default, public targets only."""
    connector = aiohttp.TCPConnector(resolver=None if allow_private else PublicOnlyResolver(), ttl_dns_cache=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), **kwargs)


def check_literal_host(url: str, *, allow_private: bool) -> None:
    """Refuse a URL whose host is a non-public IP literal (the resolver never sees those)."""
    if allow_private:
        return
    host = aiohttp.client.URL(url).host or ""
    address = literal_address(host)
    if address is not None and not is_public_address(address):
        raise BlockedAddress(f"{host} is not a public address")
