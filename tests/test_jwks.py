"""JWKS: a removed key is refused within its lifetime, junk tokens cannot lock anyone out, odd JWKS are 401s."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.simulator.server import Simulator
from tests.conftest import Gateway, auth, loopback_server, until

LIFETIME = 1.0


def public_jwk(private, kid: str) -> dict:
    algorithm = jwt.algorithms.ECAlgorithm if isinstance(private, ec.EllipticCurvePrivateKey) else jwt.algorithms.RSAAlgorithm
    jwk = json.loads(algorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "use": "sig"})
    return jwk


def token(private, kid: str, algorithm: str = "ES256", **claims) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "team": "design", "iat": now, "exp": now + 600, **claims}, private,
                      algorithm=algorithm, headers={"kid": kid})


class Jwks:
    """A JWKS endpoint whose answer the test sets: keys, a raw body, a status, or a hang."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.raw: bytes | None = None
        self.status = 200
        self.hang = asyncio.Event()
        self.hanging = False
        self.fetches = 0
        self.in_flight = 0
        self.server: TestServer | None = None

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        self.in_flight += 1
        try:
            if self.hanging:
                await self.hang.wait()
            body = self.raw if self.raw is not None else json.dumps({"keys": self.keys}).encode()
            return web.Response(body=body, status=self.status, content_type="application/json")
        finally:
            self.in_flight -= 1

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/jwks.json"))


@pytest.fixture
async def jwks() -> AsyncIterator[Jwks]:
    state = Jwks()
    async with loopback_server(("GET", "/jwks.json", state.serve)) as state.server:
        yield state
        state.hang.set()


async def jwks_gateway(start_gateway, jwks: Jwks, **overrides) -> Gateway:
    settings = {"jwt_algorithms": ("ES256", "RS256"), "jwt_secret": "", "jwt_jwks_url": jwks.url,
                "jwks_lifetime": LIFETIME, "jwks_cooldown": 0.2, **overrides}
    return await start_gateway(**settings)


async def status_code(gateway: Gateway, bearer: str) -> tuple[int, str]:
    async with gateway.http.get(f"{gateway.url}/v2/requests/status/none", headers=auth(bearer)) as response:
        body = await response.json()
        return response.status, body.get("message", "")


async def test_a_key_removed_from_the_jwks_is_refused_within_its_lifetime(start_gateway, jwks: Jwks) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [public_jwk(old, "old"), public_jwk(new, "new")]
    gateway = await jwks_gateway(start_gateway, jwks)
    verified_before = token(old, "old")
    assert (await status_code(gateway, verified_before))[0] == 404  # accepted: the handle is unknown

    jwks.keys = [public_jwk(new, "new")]  # the identity provider revokes "old"
    removed_at = time.monotonic()
    await until(lambda: gateway.services.authenticator.jwks.current("old") is False, timeout=LIFETIME + 1)

    assert time.monotonic() - removed_at <= LIFETIME + 0.5
    assert await status_code(gateway, token(old, "old")) == (401, "The token's signing key is not known")
    assert await status_code(gateway, verified_before) == (401, "The token's signing key is not known")
    assert (await status_code(gateway, token(new, "new")))[0] == 404


async def test_junk_kids_during_a_jwks_outage_never_delay_a_known_key(start_gateway, jwks: Jwks) -> None:
    good = ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [public_jwk(good, "good")]
    gateway = await jwks_gateway(start_gateway, jwks, jwks_lifetime=60.0, jwks_cooldown=0.001)
    assert (await status_code(gateway, token(good, "good")))[0] == 404
    fetched = jwks.fetches
    jwks.hanging = True  # the identity provider hangs past the fetch timeout from now on

    junk = [asyncio.create_task(status_code(gateway, token(ec.generate_private_key(ec.SECP256R1()), f"junk-{n}")))
            for n in range(40)]
    await until(lambda: jwks.in_flight == 1)
    started = time.monotonic()
    assert (await status_code(gateway, token(good, "good")))[0] == 404
    answered_in = time.monotonic() - started
    assert jwks.in_flight == 1  # the known key was verified while the one refresh still hung
    jwks.hang.set()
    results = await asyncio.gather(*junk)

    assert answered_in < 0.5
    assert {result for result in results} == {(401, "The token's signing key is not known")}
    assert jwks.fetches - fetched == 1  # forty unknown kids, one fetch


async def test_a_failing_jwks_is_asked_at_most_once_per_cooldown(start_gateway, jwks: Jwks) -> None:
    jwks.status = 500
    gateway = await jwks_gateway(start_gateway, jwks, jwks_cooldown=30.0)
    stranger = ec.generate_private_key(ec.SECP256R1())

    results = [await status_code(gateway, token(stranger, f"kid-{n}")) for n in range(40)]

    assert set(results) == {(401, "The token's signing key is not known")}
    assert jwks.fetches == 1


@pytest.mark.parametrize("raw", [b"{}", b'{"keys": []}', b"not json", b'{"keys": "x"}',
                                 b'{"keys": [{"kid": "a", "kty": "RSA"}]}', b"[" * 100_000,
                                 json.dumps({"keys": [], "pad": "x" * 2_000_000}).encode()],
                         ids=["empty", "no-keys", "not-json", "keys-not-list", "bad-key", "deep", "2MB"])
async def test_an_unusable_jwks_is_a_401_and_one_line(start_gateway, jwks: Jwks, raw: bytes,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    jwks.raw = raw
    gateway = await jwks_gateway(start_gateway, jwks)

    result = await status_code(gateway, token(ec.generate_private_key(ec.SECP256R1()), "a"))

    assert result == (401, "The token's signing key is not known")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if getattr(r, "event", None) == "jwks.failed"]) == 1


async def test_a_token_whose_algorithm_does_not_fit_its_key_is_a_401(start_gateway, jwks: Jwks, simulator: Simulator,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    rsa_key, ec_key = rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [public_jwk(rsa_key, "rsa"), public_jwk(ec_key, "ec"), {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"}]
    gateway = await jwks_gateway(start_gateway, jwks)

    cases = [token(ec_key, "rsa", "ES256"), token(rsa_key, "ec", "RS256"), token(rsa_key, "oct", "RS256")]
    results = [await status_code(gateway, case) for case in cases]

    assert results == [(401, "The token's algorithm does not match its signing key")] * 3
    assert (await status_code(gateway, token(rsa_key, "rsa", "RS256")))[0] == 404
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
