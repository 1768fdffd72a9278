"""The README's path for a new user, run as they would: CLI processes and the upstream's own example."""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hachoir.metadata import extractMetadata
from hachoir.parser import guessParser
from hachoir.stream import InputIOStream

from tests.conftest import JWT_SECRET, ROOT, free_port

# The upstream document's Python example, verbatim but for the base URL and the key.
UPSTREAM_EXAMPLE = '''
import requests
url = "{base}/grok-imagine-video-text-to-video/v1/grok-imagine-video-text-to-video-request"
headers = {{
"Content-Type": "application/json",
"Cache-Control": "no-cache",
"Ocp-Apim-Subscription-Key": "{key}"
}}
data = {{
"prompt": "Anime schoolgirl bursting out of house door, cherry blossoms blowing, morning light, speed lines, vibrant colors",
"duration": 6,
"aspect_ratio": "16:9",
"resolution": "720p"
}}
response = requests.post(url, json=data, headers=headers)
print(response.json())
'''


SIM_KEY = "quickstart-upstream-key-5f3a9c"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {key: value for key, value in os.environ.items() if not key.startswith(("PROXY_", "PIXAZO_"))}
    values.update({"PIXAZO_API_KEY": SIM_KEY, "PROXY_JWT_SECRET": JWT_SECRET, "PROXY_DB": str(tmp_path / "quickstart.db"), "PROXY_POLL_INTERVAL": "0.5"})
    return values


def wait_until_ready(base: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited early: {process.stderr.read() if process.stderr else ''}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gateway did not become ready")


def test_a_new_user_gets_a_video_through_the_gateway_with_the_upstream_example(env: dict[str, str]) -> None:
    created = cli("teams", "create", "design", "--budget", "25", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "created team design: budget 25.00 USD per month\n"
    listed = cli("teams", "list", "--json", env=env)
    assert [(t["name"], t["budget_usd"], t["period"]) for t in json.loads(listed.stdout)] == [("design", "25.00", "month")]
    token = cli("token", "mint", "--team", "design", "--user", "alice", env=env).stdout.strip()
    assert token.count(".") == 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--simulate", "--port", str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(base, server)
        example = subprocess.run([sys.executable, "-c", UPSTREAM_EXAMPLE.format(base=base, key=token)],
                                 capture_output=True, text=True, timeout=30)
        assert example.returncode == 0, example.stderr
        submitted = ast.literal_eval(example.stdout.strip())  # the example prints the response's dict repr
        assert submitted["status"] == "QUEUED"
        assert submitted["polling_url"] == f"{base}/v2/requests/status/{submitted['request_id']}"

        deadline = time.monotonic() + 20
        while True:
            request = urllib.request.Request(submitted["polling_url"], headers={"Ocp-Apim-Subscription-Key": token})
            with urllib.request.urlopen(request, timeout=5) as response:
                status = json.load(response)
            if status["status"] == "COMPLETED" or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert status["status"] == "COMPLETED"
        with urllib.request.urlopen(status["output"]["media_url"][0], timeout=5) as response:
            video = response.read()
        metadata = extractMetadata(guessParser(InputIOStream(io.BytesIO(video))))
        assert metadata.get("duration").total_seconds() == 6
        assert (metadata.get("width"), metadata.get("height")) == (1280, 720)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=15)
    assert server.returncode == 0, stderr
    assert "pixazo-proxy listening on" in stderr
    assert SIM_KEY not in stderr and JWT_SECRET not in stderr


def test_serve_without_the_upstream_key_stops_with_one_clear_line(env: dict[str, str]) -> None:
    del env["PIXAZO_API_KEY"]
    result = cli("serve", env=env)

    assert result.returncode == 2
    assert result.stderr == "pixazo-proxy: error: PIXAZO_API_KEY is not set: the real Pixazo subscription key (or run with --simulate)\n"


def test_cli_refuses_bad_budgets_and_duplicate_teams(env: dict[str, str]) -> None:
    assert cli("teams", "create", "ops", "--budget", "10", "--period", "week", env=env).returncode == 0
    duplicate = cli("teams", "create", "ops", "--budget", "10", env=env)
    tolerated = cli("teams", "create", "ops", "--budget", "99", "--exist-ok", env=env)
    negative = cli("teams", "create", "x", "--budget", "-1", env=env)
    table = cli("teams", "list", env=env)

    assert (duplicate.returncode, duplicate.stderr) == (2, "pixazo-proxy: error: team 'ops' already exists\n")
    assert (tolerated.returncode, tolerated.stdout) == (0, "team ops already exists; left as it is\n")
    assert (negative.returncode, negative.stderr) == (2, "pixazo-proxy: error: --budget: '-1' must be a finite amount of at least 0\n")
    assert table.stdout.splitlines()[1].split() == ["ops", "10.00", "week", table.stdout.splitlines()[1].split()[3]]


def test_minted_tokens_carry_the_claims_asked_for(env: dict[str, str]) -> None:
    import jwt

    token = cli("token", "mint", "--team", "ops", "--user", "bob", "--ttl", "120", "--admin", env=env).stdout.strip()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])

    assert (claims["sub"], claims["team"], claims["role"], claims["exp"] - claims["iat"]) == ("bob", "ops", "admin", 120)
