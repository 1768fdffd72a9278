"""The OpenAPI document: every route documented and nothing else; a schemathesis run against a live gateway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.store.sqlite import SQLiteStore
from tests.conftest import POLICIES, Gateway, make_token
from tests.processes import GatewayProcess

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
UNDOCUMENTED = {("POST", "/{model_id}/v1/{tail}")}  # the catch-all that answers 400 "Model not found" for unknown models


async def test_every_route_is_documented_and_nothing_else(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    routed = {(route.method, route.resource.canonical) for route in gateway.server.app.router.routes()
              if route.method != "HEAD" and not route.resource.canonical.startswith("/console")} - UNDOCUMENTED
    # /console/ is HTML for people (tests/test_console.py), not part of the API this document describes
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item if method != "parameters"}

    assert document["openapi"].startswith("3.")
    assert routed == documented


async def test_submit_schemas_come_from_the_catalog(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/openapi.json") as response:
        document = await response.json()
    path = "/grok-imagine-video-reference-to-video/v1/grok-imagine-video-reference-to-video-request"
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert schema["required"] == ["prompt", "reference_image_urls"]
    assert schema["additionalProperties"] is False
    assert (schema["properties"]["duration"]["minimum"], schema["properties"]["duration"]["maximum"],
            schema["properties"]["duration"]["default"]) == (3, 15, 8)
    assert (schema["properties"]["reference_image_urls"]["minItems"],
            schema["properties"]["reference_image_urls"]["maxItems"]) == (1, 7)


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (pip install -e '.[test]')")
async def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(tmp_path: Path) -> None:
    db = tmp_path / "fuzz.db"
    store = SQLiteStore(db)
    await store.open()
    await store.create_team("ops", 100_000_000_000, "month")
    await store.close()
    gateway = GatewayProcess(db, "http://127.0.0.1:9", POLICIES, "--simulate", PROXY_LOG_LEVEL="WARNING").start()
    token = make_token(team="ops", user="fuzzer", role="admin")
    try:
        # All checks but ST202 ("schema-valid request rejected"): a valid body may still be refused for
        # business reasons the schema cannot express (a budget the fuzzer itself lowered, a reused
        # Idempotency-Key, a webhook host that does not resolve). 5xx and off-document answers still fail.
        result = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{gateway.url}/openapi.json", "-H", f"Authorization: Bearer {token}",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance", "-n", "15",
             "--seed", "20261124", "--no-color"],
            capture_output=True, text=True, timeout=600,
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.url + "/readyz") as response:
                still_ready = response.status
    finally:
        gateway.stop()

    assert result.returncode == 0, result.stdout[-6000:]
    assert "Test cases:" in result.stdout
    assert still_ready == 200
