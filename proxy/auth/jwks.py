"""The identity provider's signing keys, from its JWKS URL: revocable, and never a way to lock users out.

* **Key lifetime.** Keys are used for at most ``lifetime`` seconds after the
  fetch that listed them (``PROXY_JWKS_LIFETIME``, default 300). The set is
  fetched again in the background once it is half that old, so a key the
  JWKS stops listing is refused within the lifetime, and with a healthy JWKS
  usually within half of it. If the JWKS cannot be fetched for a whole
  lifetime, its keys expire and tokens are refused (fail closed).
* **One fetch at a time.** At most one fetch is in flight; callers that need
  one join it. After any fetch, good or failed, the next waits at least
  ``cooldown`` seconds, so neither junk tokens nor a failing JWKS make the
  gateway hammer the identity provider.
* **Known keys never wait.** A token whose ``kid`` is in the current set is
  verified at once, whatever a background fetch is doing. Only a token whose
  ``kid`` is unknown waits, for the one fetch in flight (bounded by the fetch
  timeout), and an unknown ``kid`` is remembered as unknown for ``cooldown``
  seconds.
* **Bounded.** The JWKS document is read up to ``max_bytes`` (1 MiB); a larger
  one, non-JSON, or one with no usable key is a failed fetch, logged in one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt

from ..domain.ttlcache import TtlCache
from ..ops.stopping import stop_tasks

logger = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024 * 1024
MAX_UNKNOWN_KIDS = 10_000
#: How long a fetch cancelled at shutdown may take to unwind.
FETCH_CANCEL_SECONDS = 1.0

#: Which JWK key type (and curve) each JWS algorithm needs: a token must not be checked with a key of another kind.
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    **{f"RS{bits}": ("RSA", None) for bits in (256, 384, 512)},
    **{f"PS{bits}": ("RSA", None) for bits in (256, 384, 512)},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
}


class KeyNotKnown(Exception):
    """No current key has the token's ``kid`` (or the set could not be fetched)."""


class JwksKeys:
    def __init__(self, url: str, *, lifetime: float = 300.0, timeout: float = 5.0, cooldown: float = 10.0,
                 max_bytes: int = MAX_JWKS_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.lifetime = lifetime
        self.timeout = timeout
        self.cooldown = cooldown
        self.max_bytes = max_bytes
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._fetch: asyncio.Task[None] | None = None
        self._unknown: TtlCache[str, bool] = TtlCache(cooldown, MAX_UNKNOWN_KIDS, clock=clock)
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # attempts made, for tests and the curious

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._kick()

    async def close(self) -> None:
        if self._fetch is not None:
            await stop_tasks([self._fetch], FETCH_CANCEL_SECONDS, "JWKS fetch")
        if self._session is not None:
            await self._session.close()

    def current(self, kid: str) -> bool:
        """Whether ``kid`` names a key of the current, unexpired set (verified-token caches ask this)."""
        return kid in self._keys and self._fresh()

    async def key_for(self, kid: str) -> tuple[jwt.PyJWK, dict[str, Any]]:
        """The key named ``kid`` and its JWK; :class:`KeyNotKnown` if the current set has none."""
        if self._fresh():
            if self._clock() - (self._fetched_at or 0.0) >= self.lifetime / 2:
                self._kick()  # refresh ahead of expiry, in the background: this caller does not wait
            found = self._keys.get(kid)
            if found is not None:
                return found
        if self._unknown.get(kid):
            raise KeyNotKnown(kid)
        fetch = self._kick()
        if fetch is not None:
            await asyncio.wait({fetch}, timeout=self.timeout + 1)  # joins the fetch; never cancels it
        found = self._keys.get(kid) if self._fresh() else None
        if found is None:
            self._unknown.put(kid, True)
            raise KeyNotKnown(kid)
        return found

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at < self.lifetime

    def _kick(self) -> asyncio.Task[None] | None:
        """The fetch in flight, or a new one if the cooldown allows; None when neither."""
        if self._fetch is not None and not self._fetch.done():
            return self._fetch
        now = self._clock()
        if self._last_attempt is not None and now - self._last_attempt < self.cooldown:
            return None
        self._last_attempt = now
        self._fetch = asyncio.create_task(self._refresh(), name="jwks-fetch")
        return self._fetch

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            keys = await self._download()
        except Exception as exc:  # noqa: BLE001 - every way a fetch can fail is one warning line, then the cooldown
            logger.warning("JWKS %s could not be used: %s", self.url, _describe(exc), extra={"event": "jwks.failed"})
            return
        removed = set(self._keys) - set(keys)
        self._keys, self._fetched_at = keys, self._clock()
        self._unknown.clear()
        if removed:
            logger.info("JWKS no longer lists %s; tokens they signed are refused", ", ".join(sorted(removed)),
                        extra={"event": "jwks.keys_removed"})

    async def _download(self) -> dict[str, tuple[jwt.PyJWK, dict[str, Any]]]:
        assert self._session is not None, "JWKS client is not started"
        async with self._session.get(self.url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > self.max_bytes:
                raise ValueError(f"larger than {self.max_bytes} bytes")
            raw = await response.content.read(self.max_bytes + 1)
        if len(raw) > self.max_bytes:
            raise ValueError(f"larger than {self.max_bytes} bytes")
        document = json.loads(raw)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS document (an object with a 'keys' list)")
        keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
        for entry in document["keys"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry["kid"]] = (jwt.PyJWK(entry), entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                logger.info("JWKS key %s skipped: not a usable signing key", entry["kid"][:100])
        if not keys:
            raise ValueError("no usable signing key with a 'kid'")
        return keys


def key_problem(algorithm: str, jwk: dict[str, Any]) -> str | None:
    """Why a token signed with ``algorithm`` must not be checked with ``jwk``, or None."""
    kind = KEY_TYPES.get(algorithm)
    if kind is None:
        return f"algorithm {algorithm} is not one a JWKS key can verify here"
    key_type, curve = kind
    if jwk.get("kty") != key_type or (curve is not None and jwk.get("crv") != curve):
        return f"the key is {jwk.get('kty')}{'/' + str(jwk.get('crv')) if jwk.get('crv') else ''}, not for {algorithm}"
    if isinstance(jwk.get("alg"), str) and jwk["alg"] != algorithm:
        return f"the key is for {jwk['alg']}, not {algorithm}"
    return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return "not JSON"
    if isinstance(exc, aiohttp.ClientError):
        return type(exc).__name__
    return str(exc)[:200] or type(exc).__name__
