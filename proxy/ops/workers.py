"""``serve --workers N``: N gateway processes on one port, one set of books.

The parent starts N copies of ``serve`` (each with ``PROXY_WORKER_INDEX`` set, which makes it bind the port
with ``SO_REUSEPORT``, so the kernel spreads connections over them) and supervises them: SIGTERM or SIGINT is
passed on to every worker, which finishes what it has in flight; a worker that dies unexpectedly is started
again after a pause. Everything that must hold across the workers (budgets, dedup, idempotency, rate limits,
leases for status calls, the tracker, the outbox and the sweeper) is kept in the store, with either backend.

Counters and histograms of every worker are exported together: the workers share a prometheus-client
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, a fresh temporary one unless set), and whichever worker
answers a scrape adds them up; the figures read from the store are added once, by that worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

logger = logging.getLogger("proxy.workers")

RESTART_PAUSE_SECONDS = 1.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def supervise(count: int, argv: list[str], *, stop_seconds: float) -> int:
    """Run ``count`` workers of ``serve`` (``argv`` without ``--workers``) until told to stop; an exit code.

    Stopping keeps the workers' own bound: each worker stops within ``stop_seconds`` (PROXY_SHUTDOWN_SECONDS)
    of the signal passed on; one still running then (stopped by SIGSTOP, or stuck) is killed, said so, and the
    exit code is 1. Otherwise it is 0, or the first worker's non-zero exit code.
    """
    args = _without_workers(argv)
    own_directory = MULTIPROC_ENV not in os.environ
    directory = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="pixazo-metrics-")
    for name in os.listdir(directory):  # what workers of an earlier run left would be counted again
        os.remove(os.path.join(directory, name))
    stopping = False
    passed_on = signal.SIGTERM
    workers: dict[int, subprocess.Popen[bytes]] = {}

    def start(index: int) -> None:
        env = {**os.environ, "PROXY_WORKER_INDEX": str(index), "PROXY_WORKERS": "1", MULTIPROC_ENV: directory}
        workers[index] = subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], env=env)

    def stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping, passed_on
        stopping = True
        passed_on = signal.Signals(signum)
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                return _wait_for_all(workers, time.monotonic() + stop_seconds, passed_on)
            for index, worker in list(workers.items()):
                code = worker.poll()
                if code is not None and not stopping:
                    print(f"pixazo-proxy: worker {index} exited with {code}; starting it again", file=sys.stderr)
                    time.sleep(RESTART_PAUSE_SECONDS)
                    start(index)
    finally:
        if own_directory:
            shutil.rmtree(directory, ignore_errors=True)


def _wait_for_all(workers: dict[int, subprocess.Popen[bytes]], deadline: float, passed_on: signal.Signals) -> int:
    """Wait for every worker until ``deadline`` (monotonic); kill the ones still running. An exit code.

    A worker ended by the signal passed on to it stopped cleanly too: it was still starting, before its own
    handlers were in place, so it had served nothing.
    """
    code = 0
    for index, worker in sorted(workers.items()):
        try:
            returned = worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"pixazo-proxy: worker {index} (pid {worker.pid}) did not stop in time; killed", file=sys.stderr)
            worker.kill()
            worker.wait()
            code = 1
            continue
        if returned not in (0, -passed_on) and code == 0:
            print(f"pixazo-proxy: worker {index} stopped with exit code {returned}", file=sys.stderr)
            code = returned if returned > 0 else 1
    return code


def _without_workers(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        kept.append(arg)
    return kept
