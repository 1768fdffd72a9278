"""Who is calling: the gateway's own JWT, where the upstream subscription key used to go.

A token is read from ``Ocp-Apim-Subscription-Key`` (so an existing client
only swaps its key) or ``Authorization: Bearer``. Algorithms are an explicit
allow-list from the config; ``none`` is never on it, and HMAC and public-key
algorithms are never mixed (config refuses that).
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import SYMMETRIC_ALGORITHMS, Config, ConfigError
from ..domain.errors import Forbidden, Unauthorized
from ..domain.ttlcache import TtlCache
from ..domain.values import Principal
from ..store import Store, Team
from .jwks import JwksKeys, KeyNotKnown, key_problem

logger = logging.getLogger(__name__)

KEY_HEADER = "Ocp-Apim-Subscription-Key"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's principal and its team's row as the store has it now."""

    principal: Principal
    team: Team

#: How long a verified token's claims are reused without checking its signature again (its expiry is checked on
#: every request, and with a JWKS, that its key is still listed), and how many distinct tokens are remembered.
VERIFIED_TOKEN_SECONDS = 60.0
VERIFIED_TOKENS = 10_000

#: What a client is told for each way a token can fail, most specific first.
_TOKEN_PROBLEMS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "The token has expired"),
    (jwt.ImmatureSignatureError, "The token is not valid yet"),
    (jwt.InvalidAudienceError, "The token's audience is not accepted"),
    (jwt.InvalidIssuerError, "The token's issuer is not accepted"),
    (jwt.InvalidAlgorithmError, "The token's algorithm is not allowed"),
    (jwt.InvalidSignatureError, "The token's signature is invalid"),
    (jwt.InvalidKeyError, "The token's signing key cannot verify it"),
    (Exception, "The token is malformed"),
)


def bearer_token(headers: Any) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("The Authorization header must read 'Bearer <token>'")
    return token.strip()


class Authenticator:
    """Verifies gateway tokens and resolves them to a :class:`Principal` of a known team."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.algorithms = list(config.jwt_algorithms)
        self._symmetric = bool(set(self.algorithms) & SYMMETRIC_ALGORITHMS)
        self._static_key: Any = None
        self.jwks: JwksKeys | None = None
        if self._symmetric:
            self._static_key = config.jwt_secret.reveal()
        elif config.jwt_public_key:
            self._static_key = _read_public_key(config.jwt_public_key)
        else:
            self.jwks = JwksKeys(config.jwt_jwks_url, lifetime=config.jwks_lifetime, cooldown=config.jwks_cooldown)
        self._verified: TtlCache[str, tuple[int, dict[str, Any], str | None]] = TtlCache(
            VERIFIED_TOKEN_SECONDS, VERIFIED_TOKENS)

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    def token_from(self, headers: Any) -> str:
        subscription_key = headers.get(KEY_HEADER)
        bearer = bearer_token(headers)
        if subscription_key is not None and bearer is not None and subscription_key.strip() != bearer:
            raise Unauthorized(f"Send one gateway token, in {KEY_HEADER} or Authorization, not two different ones")
        token = (bearer or subscription_key or "").strip()
        if not token:
            raise Unauthorized(f"Missing gateway token: send it in {KEY_HEADER} or as Authorization: Bearer <token>")
        if len(token) > self.config.max_token_bytes:
            raise Unauthorized(f"The token is longer than {self.config.max_token_bytes} bytes")
        upstream_key = self.config.upstream_key.reveal()
        if upstream_key and hmac.compare_digest(token.encode(), upstream_key.encode()):
            logger.warning("a client sent the upstream subscription key itself as its token; refused")
            raise Unauthorized("The upstream subscription key is not accepted here: use your gateway token")
        return token

    async def authenticate(self, headers: Any) -> Principal:
        """The caller behind ``headers``; :class:`Unauthorized` or :class:`Forbidden` otherwise."""
        return (await self.identify(headers)).principal

    async def identify(self, headers: Any) -> Caller:
        """The caller behind ``headers`` and their team as the store has it now."""
        claims = await self.verify(self.token_from(headers))
        team_claim = self.config.jwt_team_claim
        user, team = claims.get("sub"), claims.get(team_claim)
        if not isinstance(user, str) or not user.strip():
            raise Unauthorized("The token's 'sub' claim must be a non-empty string")
        if not isinstance(team, str) or not team.strip():
            raise Unauthorized(f"The token's '{team_claim}' claim must be a non-empty string")
        team_record = await self.store.get_team(team)
        if team_record is None:
            raise Forbidden(f"Team '{team}' is not known to this gateway")
        return Caller(Principal(user=user, team=team, admin=claims.get("role") == "admin"), team_record)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once signature, algorithm, expiry, issuer and audience check out.

        The same token string verified a moment ago is not verified again (its bytes, signature included,
        verify the same way), but its expiry is checked every time.
        """
        verified = self._verified.get(token)
        if verified is not None:
            expires, claims, kid = verified
            if time.time() < expires and (kid is None or self.jwks is None or self.jwks.current(kid)):
                return claims
            self._verified.forget(token)
        claims, kid = await self._decode(token)
        self._verified.put(token, (int(claims["exp"]), claims, kid))  # int(): as PyJWT reads it
        return claims

    async def _signing_key(self, token: str) -> tuple[Any, str | None]:
        """The key to check ``token`` with, and its JWKS ``kid`` (None for a configured secret or PEM)."""
        if self.jwks is None:
            return self._static_key, None
        header = jwt.get_unverified_header(token)
        kid, algorithm = header.get("kid"), header.get("alg")
        if algorithm not in self.algorithms:
            raise Unauthorized("The token's algorithm is not allowed")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("The token names no signing key ('kid')")
        try:
            key, jwk = await self.jwks.key_for(kid)
        except KeyNotKnown:
            raise Unauthorized("The token's signing key is not known") from None
        if key_problem(algorithm, jwk) is not None:
            raise Unauthorized("The token's algorithm does not match its signing key")
        return key.key, kid

    async def _decode(self, token: str) -> tuple[dict[str, Any], str | None]:
        try:
            key, kid = await self._signing_key(token)
            return jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.config.jwt_audience or None,
                issuer=self.config.jwt_issuer or None,
                options={
                    "require": ["exp", "sub", self.config.jwt_team_claim],
                    "verify_aud": bool(self.config.jwt_audience),
                },
            ), kid
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"The token lacks the '{exc.claim}' claim") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError) as exc:
            message = next(text for kind, text in _TOKEN_PROBLEMS if isinstance(exc, kind))
            raise Unauthorized(message) from None
        except (TypeError, ValueError) as exc:  # a key the token's algorithm cannot use: refused, in one line
            logger.info("token refused: its key cannot verify it (%s)", type(exc).__name__)
            raise Unauthorized("The token's signing key cannot verify it") from None


def _read_public_key(value: str) -> str:
    """A PEM given inline, or the path of a file holding one; checked at start-up."""
    if "-----BEGIN" not in value:
        try:
            value = Path(value).read_text()
        except OSError as exc:
            raise ConfigError(f"PROXY_JWT_PUBLIC_KEY: cannot read {value}: {exc.strerror}") from None
    try:
        load_pem_public_key(value.encode())
    except ValueError:
        raise ConfigError("PROXY_JWT_PUBLIC_KEY is not a PEM public key") from None
    return value


def mint_token(config: Config, *, team: str, user: str, ttl_seconds: int, admin: bool = False) -> str:
    """A token signed with ``PROXY_JWT_SECRET`` (HMAC setups only), as ``token mint`` prints."""
    if not config.jwt_secret:
        raise ValueError("PROXY_JWT_SECRET is not set")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, config.jwt_team_claim: team, "iat": now, "exp": now + ttl_seconds}
    if admin:
        claims["role"] = "admin"
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    algorithm = next((a for a in config.jwt_algorithms if a in SYMMETRIC_ALGORITHMS), "HS256")
    return jwt.encode(claims, config.jwt_secret.reveal(), algorithm=algorithm)
