"""Signing in to the console: one-time links, sessions and their CSRF tokens (no HTTP types here).

A link or a session is a random token handed to one person; the store keeps only its SHA-256, so a copy of
the database signs nobody in. A link is used up by the first request that redeems it (one conditional
update in the store, so two replicas cannot both accept it) and expires after its time to live anyway.
A session carries its own CSRF token, which every state-changing form must send back.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

from ..domain.clock import iso_utc
from ..store import ConsoleIdentity, ConsoleSession, Store

#: The session cookie's name, and the login form's double-submit cookie (a form posted before any session).
SESSION_COOKIE = "pixazo_console"
LOGIN_COOKIE = "pixazo_console_login"
#: How long a one-time link stays valid when ``--ttl`` is not given, and the longest it may be.
DEFAULT_LINK_SECONDS = 600
MAX_LINK_SECONDS = 7 * 24 * 3600
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,100}")
_TTL = re.compile(r"([0-9]{1,7})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def well_formed(token: str | None) -> bool:
    """Whether ``token`` could be one of ours (anything else is refused without a store round trip)."""
    return token is not None and _TOKEN.fullmatch(token) is not None


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` -> seconds; ValueError past :data:`MAX_LINK_SECONDS` or malformed."""
    match = _TTL.fullmatch(text.strip())
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 1 <= seconds <= MAX_LINK_SECONDS:
        raise ValueError(f"--ttl must be like 90s, 10m, 2h or 1d, at most {MAX_LINK_SECONDS // 86400} days")
    return seconds


async def new_link(store: Store, identity: ConsoleIdentity, seconds: int) -> str:
    """A one-time sign-in token for ``identity``, valid for ``seconds``; only its hash is stored."""
    token = secrets.token_urlsafe(32)
    await store.add_console_link(digest(token), identity, iso_utc(datetime.now(UTC) + timedelta(seconds=seconds)))
    return token


async def start_session(store: Store, identity: ConsoleIdentity, seconds: float) -> tuple[str, ConsoleSession]:
    """A new session for ``identity`` lasting ``seconds``: its cookie value (given once) and the session."""
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    session = ConsoleSession(identity, secrets.token_urlsafe(24), iso_utc(now + timedelta(seconds=seconds)))
    await store.add_console_session(digest(token), identity, session.csrf, iso_utc(now), session.expires_at)
    return token, session


async def session_of(store: Store, cookie: str | None) -> ConsoleSession | None:
    """The live session a cookie value names, or None (unknown, expired, signed out, or not one of ours)."""
    if not well_formed(cookie):
        return None
    assert cookie is not None
    return await store.console_session(digest(cookie), iso_utc())


def new_form_nonce() -> str:
    """The value a sign-in form and its cookie both carry (a login form posted from elsewhere has no cookie)."""
    return secrets.token_urlsafe(24)


def csrf_matches(expected: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(expected.encode(), sent.encode())
