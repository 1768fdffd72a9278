"""The default policies ship with the package: an installed gateway runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxy.config import PACKAGED_POLICIES
from tests.conftest import JWT_SECRET, POLICIES, free_port


def test_the_packaged_policies_are_the_repositorys() -> None:
    packaged = {path.name: path.read_text() for path in PACKAGED_POLICIES.glob("*.toml")}
    editable = {path.name: path.read_text() for path in POLICIES.glob("*.toml")}

    assert packaged == editable and len(packaged) == 5


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXY_", "PIXAZO_"))}
    return env | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra}


def test_serve_simulate_and_policies_check_work_from_any_directory(tmp_path: Path) -> None:
    """Run where there is no policies/ at all: the packaged defaults are used."""
    env = clean_env(PROXY_JWT_SECRET=JWT_SECRET, PROXY_DB=str(tmp_path / "anywhere.db"))
    check = subprocess.run([sys.executable, "-m", "proxy.cli", "policies", "check"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    created = subprocess.run([sys.executable, "-m", "proxy.cli", "teams", "create", "design", "--budget", "5"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.startswith(f"{PACKAGED_POLICIES}: ok (4 models"), check.stderr
    assert created.returncode == 0, created.stderr

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--simulate", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not become ready"
                time.sleep(0.05)
    finally:
        server.terminate()
        server.communicate(timeout=15)
