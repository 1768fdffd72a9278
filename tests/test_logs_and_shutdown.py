"""Structured logs (one JSON event per line, no secrets) and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3

import pytest
import requests

from proxy.simulator.server import Fault, Simulator
from proxy.store.sqlite import SQLiteStore
from tests.conftest import JWT_SECRET, POLICIES, TEXT_PATH, UPSTREAM_KEY, auth
from tests.processes import GatewayProcess


async def _team(db) -> None:
    store = SQLiteStore(db)
    await store.open()
    await store.create_team("design", 10_000_000, "month")
    await store.close()


async def test_logs_are_json_lines_with_event_fields_and_no_secrets(tmp_path, simulator: Simulator) -> None:
    db = tmp_path / "logs.db"
    await _team(db)
    gateway = GatewayProcess(db, simulator.url, POLICIES).start()  # type: ignore[attr-defined]
    try:
        token = auth()["Ocp-Apim-Subscription-Key"]
        accepted = await asyncio.to_thread(requests.post, gateway.url + TEXT_PATH, json={"prompt": "p"}, headers=auth())
        await asyncio.to_thread(requests.post, gateway.url + TEXT_PATH, json={"prompt": "p"},
                                headers={"Ocp-Apim-Subscription-Key": UPSTREAM_KEY, "Content-Type": "application/json"})
    finally:
        stderr = gateway.stop()

    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    handle = accepted.json()["request_id"]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    requests_logged = [line for line in lines if line.get("event") == "http.request" and line["method"] == "POST"]
    assert [(line["status"], line.get("handle")) for line in requests_logged] == [(202, handle), (401, None)]
    submit = requests_logged[0]  # one line per request tells the whole story
    assert (submit["handle"], submit["team"], submit["user"], submit["model"], submit["cache"]) == (
        handle, "design", "alice", "grok-imagine-video-text-to-video", "MISS")
    assert [line.get("event") for line in lines].count("submit.accepted") == 0  # DEBUG only: no second line per submit
    assert all(isinstance(line["duration_ms"], float) for line in requests_logged)
    assert UPSTREAM_KEY not in stderr and JWT_SECRET not in stderr and token not in stderr


async def test_the_text_format_is_for_people(tmp_path, simulator: Simulator) -> None:
    db = tmp_path / "text.db"
    await _team(db)
    gateway = GatewayProcess(db, simulator.url, POLICIES, PROXY_LOG_FORMAT="text").start()  # type: ignore[attr-defined]
    stderr = gateway.stop()

    first = stderr.splitlines()[0]
    assert " INFO proxy." in first and not first.startswith("{")


async def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(tmp_path, simulator: Simulator) -> None:
    db = tmp_path / "term.db"
    await _team(db)
    gateway = GatewayProcess(db, simulator.url, POLICIES).start()  # type: ignore[attr-defined]
    simulator.add_fault(Fault(op="submit", kind="delay", delay=1.0))
    pending = asyncio.create_task(asyncio.to_thread(
        requests.post, gateway.url + TEXT_PATH, json={"prompt": "p"}, headers=auth(), timeout=20))
    while not simulator.calls_of("submit"):
        await asyncio.sleep(0.02)

    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    response = await pending
    await asyncio.to_thread(gateway.process.wait, timeout=20)  # no second signal
    stderr = gateway.stderr()

    assert response.status_code == 202
    assert gateway.process.returncode == 0
    assert json.loads(stderr.strip().splitlines()[-1])["event"] == "shutdown"
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT status FROM jobs").fetchall() == [("QUEUED",)]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_the_gateway_serves_on_the_event_loop_it_was_given(tmp_path, simulator: Simulator, loop: str) -> None:
    db = tmp_path / f"{loop}.db"
    await _team(db)
    gateway = GatewayProcess(db, simulator.url, POLICIES, PROXY_EVENT_LOOP=loop).start()  # type: ignore[attr-defined]
    try:
        accepted = await asyncio.to_thread(requests.post, gateway.url + TEXT_PATH, json={"prompt": loop},
                                           headers=auth())
    finally:
        stderr = gateway.stop()

    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert accepted.status_code == 202
    assert [line["message"].split(" ")[:3] for line in lines if line["message"].startswith("event loop:")] == [
        ["event", "loop:", loop]]
