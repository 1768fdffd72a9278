"""A gateway in a process of its own, so a test can kill it with SIGKILL and start it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.conftest import JWT_SECRET, ROOT, UPSTREAM_KEY, free_port


class GatewayProcess:
    def __init__(self, db: Path | str, upstream: str, policies: Path, *serve_args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXY_", "PIXAZO_"))}
        self.env.update({"PIXAZO_API_KEY": UPSTREAM_KEY, "PROXY_JWT_SECRET": JWT_SECRET, "PROXY_DB": str(db),
                         "PIXAZO_UPSTREAM_URL": upstream, "PROXY_POLICIES": str(policies), "PROXY_PORT": str(self.port),
                         "PROXY_POLL_INTERVAL": "0.05", **env})
        self.serve_args = serve_args
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="gateway-", suffix=".log")  # a file: a pipe nobody reads fills up

    def start(self) -> GatewayProcess:
        self.log.seek(0)
        self.log.truncate()
        self.process = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", *self.serve_args], env=self.env, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited: {self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("gateway did not become ready")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, as a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> str:
        """SIGTERM and wait; its stderr."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=15)
        return self.stderr()


def stop_all(started: list[GatewayProcess]) -> None:
    """SIGTERM every process still running; print what each logged at ERROR (shown with a failing test's report)."""
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.stop()
        errors = [line for line in process.stderr().splitlines() if '"level": "error"' in line]
        if errors:
            print(f"gateway on port {process.port} logged errors:", *errors[:20], sep="\n")
