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


#: IPv6 ranges refused outright: each can carry (or translate to) an IPv4 address the checks below would not see.
_REFUSED_IPV6 = tuple(ipaddress.IPv6Network(network) for network in (
    "64:ff9b::/96",      # NAT64, well-known prefix (RFC 6052): 64:ff9b::a9fe:a9fe is 169.254.169.254
    "64:ff9b:1::/48",    # NAT64, local-use prefix (RFC 8215)
    "::ffff:0:0:0/96",   # IPv4-translated (RFC 2765)
    "::/96",             # IPv4-compatible (deprecated, RFC 4291), and :: and ::1
    "fec0::/10",         # site-local (deprecated, RFC 3879): private in practice
))


def is_public_address(text: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local, CGNAT, multicast...

    IPv6 forms that embed an IPv4 address are judged by it (IPv4-mapped, 6to4, both ends of Teredo), and
    those that translate to one (NAT64, IPv4-translated, IPv4-compatible) are refused, as is site-local.
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(str(address.ipv4_mapped))
        if any(address in network for network in _REFUSED_IPV6):
            return False
        if address.sixtofour is not None:
            return is_public_address(str(address.sixtofour))
        if address.teredo is not None:
            return all(is_public_address(str(end)) for end in address.teredo)
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
