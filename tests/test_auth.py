"""Gateway tokens: who may call, and that no refused call ever reaches the upstream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.simulator.server import Simulator
from tests.conftest import JWT_SECRET, TEXT_PATH, UPSTREAM_KEY, Gateway, LoopbackServer, auth, free_port, make_token

REFUSED_401 = [
    ("missing", None, "Missing gateway token: send it in Ocp-Apim-Subscription-Key or as Authorization: Bearer <token>"),
    ("malformed", "not-a-jwt", "The token is malformed"),
    ("expired", make_token(ttl=-60), "The token has expired"),
    ("not yet valid", make_token(nbf=int(time.time()) + 3600), "The token is not valid yet"),
    ("bad signature", make_token(secret="another-secret-that-is-long-enough-0123"), "The token's signature is invalid"),
    ("alg none", jwt.encode({"sub": "a", "team": "design", "exp": int(time.time()) + 60}, None, algorithm="none"),
     "The token's algorithm is not allowed"),
    ("alg not on the list", make_token(algorithm="HS512", secret=JWT_SECRET * 2), "The token's algorithm is not allowed"),
    ("no team claim", make_token(team=None), "The token lacks the 'team' claim"),
    ("no exp", jwt.encode({"sub": "a", "team": "design"}, JWT_SECRET, algorithm="HS256"), "The token lacks the 'exp' claim"),
    ("empty sub", make_token(user=""), "The token's 'sub' claim must be a non-empty string"),
    ("team not a string", make_token(team=["design"]), "The token's 'team' claim must be a non-empty string"),
    ("upstream key as token", UPSTREAM_KEY, "The upstream subscription key is not accepted here: use your gateway token"),
    ("oversized", "a" * 9000, "The token is longer than 8192 bytes"),
]


@pytest.mark.parametrize(("case", "token", "message"), REFUSED_401, ids=[case for case, _, _ in REFUSED_401])
async def test_refused_tokens_get_401_in_the_upstream_shape_and_never_reach_upstream(
    gateway: Gateway, simulator: Simulator, case: str, token: str | None, message: str
) -> None:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Ocp-Apim-Subscription-Key"] = token

    code, body, _ = await gateway.submit(TEXT_PATH, headers=headers)
    status_code, status_body = await gateway.status("grok-imagine-video-text-to-video_x", headers)

    assert (code, body) == (401, {"error": "Unauthorized", "message": message})
    assert (status_code, status_body) == (401, {"error": "Unauthorized", "message": message})
    assert simulator.calls == []


async def test_a_known_token_of_an_unknown_team_is_403(gateway: Gateway, simulator: Simulator) -> None:
    code, body, _ = await gateway.submit(headers=auth(team="ghost"))

    assert (code, body) == (403, {"error": "Forbidden", "message": "Team 'ghost' is not known to this gateway"})
    assert simulator.calls == []


async def test_bearer_header_is_accepted_too(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {make_token()}"}

    code, body, _ = await gateway.submit(headers=headers)

    assert code == 202, body


async def test_two_different_tokens_are_refused(gateway: Gateway, simulator: Simulator) -> None:
    headers = auth(make_token(user="alice")) | {"Authorization": f"Bearer {make_token(user='mallory')}"}

    code, body, _ = await gateway.submit(headers=headers)

    assert code == 401
    assert body["message"] == "Send one gateway token, in Ocp-Apim-Subscription-Key or Authorization, not two different ones"
    assert simulator.calls == []


async def test_non_bearer_authorization_is_refused(gateway: Gateway) -> None:
    code, body, _ = await gateway.submit(headers={"Authorization": "Basic YWxpY2U6cHc="})

    assert (code, body["message"]) == (401, "The Authorization header must read 'Bearer <token>'")


async def test_issuer_and_audience_are_checked_when_configured(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(jwt_issuer="https://idp.example.com", jwt_audience="pixazo-proxy")
    good = make_token(iss="https://idp.example.com", aud="pixazo-proxy")

    assert (await gateway.submit(headers=auth(good)))[0] == 202
    wrong_aud = await gateway.submit(headers=auth(make_token(iss="https://idp.example.com", aud="other")))
    wrong_iss = await gateway.submit(headers=auth(make_token(iss="https://evil.example.com", aud="pixazo-proxy")))
    no_aud = await gateway.submit(headers=auth(make_token(iss="https://idp.example.com")))

    assert (wrong_aud[0], wrong_aud[1]["message"]) == (401, "The token's audience is not accepted")
    assert (wrong_iss[0], wrong_iss[1]["message"]) == (401, "The token's issuer is not accepted")
    assert (no_aud[0], no_aud[1]["message"]) == (401, "The token lacks the 'aud' claim")
    assert len(simulator.calls_of("submit")) == 1


async def test_team_claim_name_is_configurable(start_gateway) -> None:
    gateway = await start_gateway(jwt_team_claim="org")

    accepted = await gateway.submit(headers=auth(make_token(team=None, org="design")))
    refused = await gateway.submit(headers=auth(make_token()))

    assert accepted[0] == 202
    assert (refused[0], refused[1]["message"]) == (401, "The token lacks the 'org' claim")


def _claims() -> dict:
    return {"sub": "alice", "team": "design", "exp": int(time.time()) + 60}


def _rsa_pair() -> tuple[rsa.RSAPrivateKey, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public_pem


async def test_rs256_with_a_public_key_and_no_algorithm_confusion(start_gateway, simulator: Simulator, tmp_path) -> None:
    private, public_pem = _rsa_pair()
    key_file = tmp_path / "jwt.pub.pem"
    key_file.write_text(public_pem)
    gateway = await start_gateway(jwt_algorithms=("RS256",), jwt_secret="", jwt_public_key=str(key_file))

    good = make_token(secret=private, algorithm="RS256")  # type: ignore[arg-type]
    confused = _hs256_with_raw_key(_claims(), public_pem)

    assert (await gateway.submit(headers=auth(good)))[0] == 202
    refused = await gateway.submit(headers=auth(confused))
    assert (refused[0], refused[1]["message"]) == (401, "The token's algorithm is not allowed")
    assert len(simulator.calls_of("submit")) == 1


def _hs256_with_raw_key(claims: dict, key: str) -> str:
    """An HS256 token whose HMAC key is the RSA public key's PEM text: the classic confusion attack."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_es256_tokens_verified_through_a_jwks_url(start_gateway, simulator: Simulator) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": "key-1", "use": "sig", "alg": "ES256"})
    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    jwks_app = web.Application()
    jwks_app.router.add_get("/jwks.json", serve_jwks)
    jwks = LoopbackServer(jwks_app, host="127.0.0.1", port=free_port())
    await jwks.start_server()
    try:
        gateway = await start_gateway(
            jwt_algorithms=("ES256",), jwt_secret="", jwt_jwks_url=str(jwks.make_url("/jwks.json"))
        )
        good = jwt.encode(_claims(), private, algorithm="ES256", headers={"kid": "key-1"})
        forged = jwt.encode(_claims(), private, algorithm="ES256", headers={"kid": "key-404"})
        other_key = jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                               headers={"kid": "key-1"})

        assert (await gateway.submit(headers=auth(good)))[0] == 202
        refused_kid = await gateway.submit(headers=auth(forged))
        refused_key = await gateway.submit(headers=auth(other_key))
        assert (refused_kid[0], refused_kid[1]["message"]) == (401, "The token's signing key is not known")
        assert (refused_key[0], refused_key[1]["message"]) == (401, "The token's signature is invalid")
        assert len(simulator.calls_of("submit")) == 1
    finally:
        await jwks.close()
