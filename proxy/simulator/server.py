"""A stand-in for Pixazo's Grok Imagine Video API, built from the upstream document.

Same submit paths, same validation (the same catalog the gateway uses), a
checked subscription key, the status flow QUEUED -> PROCESSING ->
COMPLETED/FAILED/ERROR driven by the clock, webhook callbacks in ``terminal``
and ``sync`` modes, and a real small MP4 (of the job's duration and
resolution) as ``media_url``. It lets anyone run the gateway with no account,
and it is what the tests drive instead of mocks.

Knobs, in process (``Simulator`` methods) or over HTTP under ``/_simulator/``
(same subscription key):

* ``settings``: ``queued_seconds``, ``processing_seconds``, ``edit_video_seconds``;
* ``outcomes``: the outcomes of the next jobs, in order (``COMPLETED``,
  ``FAILED``, ``ERROR``, or ``STUCK`` to stay PROCESSING until finished);
* ``faults``: the next calls of an operation (``submit``, ``status``, ``any``)
  answer an HTTP status (with optional ``Retry-After``), reset the connection,
  answer malformed or truncated JSON, or wait ``delay`` seconds first; with
  ``stage = "after"`` a submit fault strikes after the job was created;
  ``kind = "patch"`` answers as usual with the fields of ``patch`` written over
  the JSON body (odd or hostile values a real upstream might send);
* ``jobs/{id}/finish`` and ``jobs/{id}/forget``; ``calls`` lists every
  recorded API call (method, path, headers, body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web

from ..domain.catalog import Catalog
from ..domain.clock import iso_utc, new_request_id
from ..domain.errors import BadRequest, ModelNotFound, ProxyError
from ..domain.validate import normalize, parse_json
from ..domain.values import ModelSpec
from ..http.bodies import check_content_type
from ..http.problems import error_response
from .mp4 import build_mp4

logger = logging.getLogger(__name__)

KEY_HEADER = "Ocp-Apim-Subscription-Key"
OUTCOMES = ("COMPLETED", "FAILED", "ERROR", "STUCK")
FAULT_KINDS = ("status", "reset", "malformed", "truncated", "delay", "patch")
TERMINAL = ("COMPLETED", "FAILED", "ERROR")
DOCUMENTED_ERRORS = {402: ("Insufficient Balance", "Your wallet does not have enough balance.")}
OUTCOME_ERRORS = {
    "FAILED": "Generation failed: the model could not produce a video for this request",
    "ERROR": "Internal error while processing the request",
}


@dataclass
class SimulatorSettings:
    key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    queued_seconds: float = 1.0
    processing_seconds: float = 3.0
    edit_video_seconds: int = 8
    allow_http_webhooks: bool = False
    webhook_timeout: float = 5.0
    media_available: bool = True  # False: output links answer 404, as expired ones do
    max_in_flight: int | None = None  # the account's jobs running at once; one more submit is 429 (Retry-After: 1)


@dataclass
class Fault:
    """What the next ``times`` calls of ``op`` suffer."""

    op: str = "any"
    kind: str = "status"
    status: int = 500
    retry_after: str | None = None
    delay: float = 0.0
    stage: str = "before"
    times: int = 1
    patch: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("submit", "status", "any"):
            raise ValueError("op must be submit, status or any")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if self.stage not in ("before", "after"):
            raise ValueError("stage must be before or after")
        if not 100 <= self.status <= 599 or self.times < 1 or self.delay < 0:
            raise ValueError("status must be an HTTP status, times at least 1, delay at least 0")
        if (self.kind == "patch") != isinstance(self.patch, dict):
            raise ValueError("a patch fault needs a patch object, and only a patch fault takes one")


@dataclass
class RecordedCall:
    op: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class SimJob:
    id: str
    model: str
    params: dict[str, Any]
    outcome: str
    started: float
    created_at: datetime
    media_base: str
    webhook_url: str | None = None
    webhook_mode: str = "terminal"
    finished_after: float | None = None
    forgotten: bool = False


class Simulator:
    """The simulator's state and its aiohttp application (:meth:`build_app`)."""

    def __init__(self, catalog: Catalog, settings: SimulatorSettings | None = None) -> None:
        self.catalog = catalog
        self.settings = settings or SimulatorSettings()
        self.jobs: dict[str, SimJob] = {}
        self.calls: list[RecordedCall] = []
        self.outcomes: deque[str] = deque()
        self.faults: list[Fault] = []
        self.webhook_deliveries: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.most_in_flight = 0  # the most jobs running at once, seen at each accepted submit
        self.over_capacity = 0  # submits refused with 429 because max_in_flight jobs were running

    # knobs

    def queue_outcomes(self, *outcomes: str) -> None:
        for outcome in outcomes:
            if outcome not in OUTCOMES:
                raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
        self.outcomes.extend(outcomes)

    def add_fault(self, fault: Fault) -> None:
        """Inject ``fault``; the simulator counts down a copy, so one Fault may be given again (to another run)."""
        self.faults.append(dataclasses.replace(fault))

    def finish(self, job_id: str, outcome: str) -> None:
        """End a job now (a STUCK one included) with ``outcome``."""
        if outcome not in TERMINAL:
            raise ValueError("outcome must be COMPLETED, FAILED or ERROR")
        job = self.jobs[job_id]
        job.outcome = outcome
        job.finished_after = time.monotonic() - job.started

    def forget(self, job_id: str) -> None:
        """From now on the upstream answers 404 for this job, as if it lost it."""
        self.jobs[job_id].forgotten = True

    def in_flight(self) -> int:
        """Jobs accepted and not yet ended, now."""
        now = time.monotonic()
        return sum(1 for job in self.jobs.values() if self.status_of(job, now)[0] not in TERMINAL)

    def reset(self) -> None:
        self.most_in_flight = self.over_capacity = 0
        self.jobs.clear()
        self.calls.clear()
        self.outcomes.clear()
        self.faults.clear()
        self.webhook_deliveries.clear()

    def calls_of(self, op: str) -> list[RecordedCall]:
        return [call for call in self.calls if call.op == op]

    # the status flow

    def status_of(self, job: SimJob, now: float | None = None) -> tuple[str, float]:
        """The job's status and the seconds after creation it took it."""
        elapsed = (time.monotonic() if now is None else now) - job.started
        queued, processing = self.settings.queued_seconds, self.settings.processing_seconds
        if job.finished_after is not None and elapsed >= job.finished_after:
            return job.outcome, job.finished_after
        if elapsed < queued:
            return "QUEUED", 0.0
        if job.outcome == "STUCK" or elapsed < queued + processing:
            return "PROCESSING", queued
        return job.outcome, queued + processing

    def status_body(self, job: SimJob) -> dict[str, Any]:
        status, since = self.status_of(job)
        changed = iso_utc(job.created_at + timedelta(seconds=since))
        terminal = status in TERMINAL
        output = None
        if status == "COMPLETED":
            output = {"media_url": [f"{job.media_base}/media/{job.id}/output.mp4"], "media_type": "video/mp4"}
        return {
            "request_id": job.id,
            "status": status,
            "model_id": job.model,
            "error": OUTCOME_ERRORS.get(status),
            "output": output,
            "created_at": iso_utc(job.created_at),
            "updated_at": changed,
            "completed_at": changed if terminal else None,
        }

    def media_shape(self, job: SimJob) -> tuple[int, str]:
        seconds = job.params.get("duration", self.settings.edit_video_seconds)
        resolution = job.params.get("resolution", "720p")
        return seconds, "720p" if resolution == "auto" else resolution

    # HTTP

    def build_app(self) -> web.Application:
        app = web.Application()
        for model in self.catalog.models.values():
            app.router.add_post(model.path, self._submit_handler(model))
        app.router.add_post("/{model_id}/v1/{tail:.*}", self._unknown_model)
        app.router.add_get("/v2/requests/status/{request_id}", self._status)
        app.router.add_get("/media/{request_id}/output.mp4", self._media)
        app.router.add_get("/_simulator/calls", self._control_calls)
        app.router.add_get("/_simulator/stats", self._control_stats)
        app.router.add_post("/_simulator/faults", self._control_fault)
        app.router.add_post("/_simulator/outcomes", self._control_outcomes)
        app.router.add_post("/_simulator/settings", self._control_settings)
        app.router.add_post("/_simulator/jobs/{request_id}/finish", self._control_finish)
        app.router.add_post("/_simulator/jobs/{request_id}/forget", self._control_forget)
        app.router.add_post("/_simulator/reset", self._control_reset)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application) -> Any:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout))
        yield
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    def _check_key(self, request: web.Request) -> web.Response | None:
        key = request.headers.get(KEY_HEADER)
        if not key:
            return _error(401, "Unauthorized", "Access denied due to missing subscription key")
        if not secrets.compare_digest(key.encode(), self.settings.key.encode()):
            return _error(401, "Unauthorized", "Access denied due to invalid subscription key")
        return None

    def _take_fault(self, op: str, stage: str, patch: bool = False) -> Fault | None:
        for fault in self.faults:
            if fault.op in (op, "any") and (patch or fault.stage == stage) and (fault.kind == "patch") == patch:
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _faulted(self, request: web.Request, op: str, stage: str) -> web.StreamResponse | None:
        fault = self._take_fault(op, stage)
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.kind == "delay":
            return None
        if fault.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if fault.kind == "malformed":
            return web.Response(status=200 if op == "status" else 202, text="<html>upstream hiccup",
                                content_type="application/json")
        if fault.kind == "truncated":
            return web.Response(status=200 if op == "status" else 202, text='{"request_id": "grok-imag',
                                content_type="application/json")
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        title, message = DOCUMENTED_ERRORS.get(fault.status, (_reason(fault.status), "Simulated upstream fault"))
        return _error(fault.status, title, message, headers)

    def _patched(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        fault = self._take_fault(op, "", patch=True)
        return {**body, **fault.patch} if fault is not None and fault.patch is not None else body

    async def _record(self, request: web.Request, op: str) -> bytes:
        """Note the call as it arrived; the raw body, for the handler to judge."""
        raw = await request.read() if request.can_read_body else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self.calls.append(RecordedCall(op, request.method, request.path, dict(request.headers), body))
        return raw

    def _submit_handler(self, model: ModelSpec) -> Any:
        async def submit(request: web.Request) -> web.StreamResponse:
            raw = await self._record(request, "submit")
            if (refused := self._check_key(request)) is not None:
                return refused
            if (faulted := await self._faulted(request, "submit", "before")) is not None:
                return faulted
            try:
                check_content_type(request)
                params = normalize(model, parse_json(raw))
                webhook_url, webhook_mode = self._webhook_headers(request)
            except ProxyError as exc:
                return error_response(exc)
            running = self.in_flight()
            if self.settings.max_in_flight is not None and running >= self.settings.max_in_flight:
                self.over_capacity += 1
                return _error(429, "Too Many Requests", f"{running} jobs are running, the account's limit",
                              headers={"Retry-After": "1"})
            self.most_in_flight = max(self.most_in_flight, running + 1)
            job = SimJob(
                id=new_request_id(model.id),
                model=model.id,
                params=params,
                outcome=self.outcomes.popleft() if self.outcomes else "COMPLETED",
                started=time.monotonic(),
                created_at=datetime.now(UTC),
                media_base=f"{request.scheme}://{request.host}",
                webhook_url=webhook_url,
                webhook_mode=webhook_mode,
            )
            self.jobs[job.id] = job
            if webhook_url:
                self._spawn(self._deliver_webhooks(job))
            if (faulted := await self._faulted(request, "submit", "after")) is not None:
                return faulted
            return web.json_response(self._patched("submit", {
                "request_id": job.id,
                "status": "QUEUED",
                "polling_url": f"{request.scheme}://{request.host}/v2/requests/status/{job.id}",
            }), status=202)

        return submit

    def _webhook_headers(self, request: web.Request) -> tuple[str | None, str]:
        url = request.headers.get("X-Webhook-URL")
        mode = request.headers.get("X-Webhook-Mode", "terminal")
        if mode not in ("terminal", "sync"):
            raise BadRequest("X-Webhook-Mode must be terminal or sync")
        if url is None:
            return None, mode
        allowed = ("https://", "http://") if self.settings.allow_http_webhooks else ("https://",)
        if not url.startswith(allowed):
            raise BadRequest("X-Webhook-URL must be an https:// URL")
        return url, mode

    async def _unknown_model(self, request: web.Request) -> web.StreamResponse:
        await self._record(request, "submit")
        if (refused := self._check_key(request)) is not None:
            return refused
        return error_response(ModelNotFound(request.match_info["model_id"]))

    async def _status(self, request: web.Request) -> web.StreamResponse:
        await self._record(request, "status")
        if (refused := self._check_key(request)) is not None:
            return refused
        if (faulted := await self._faulted(request, "status", "before")) is not None:
            return faulted
        job = self.jobs.get(request.match_info["request_id"])
        if job is None or job.forgotten:
            return _error(404, "Not Found", "Request not found")
        return web.json_response(self._patched("status", self.status_body(job)))

    async def _media(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["request_id"])
        if job is None or self.status_of(job)[0] != "COMPLETED" or not self.settings.media_available:
            return _error(404, "Not Found", "No such media")
        seconds, resolution = self.media_shape(job)
        return web.Response(body=build_mp4(seconds, resolution), content_type="video/mp4")

    # webhooks

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_webhooks(self, job: SimJob) -> None:
        """terminal: one POST at the final status; sync: one per status change, then the final one."""
        seen: str | None = None
        while True:
            status, _ = self.status_of(job)
            if status != seen and (job.webhook_mode == "sync" or status in TERMINAL):
                await self._post_webhook(job)
            seen = status
            if status in TERMINAL:
                return
            await asyncio.sleep(min(0.05, self.settings.queued_seconds / 4 or 0.05))

    async def _post_webhook(self, job: SimJob) -> None:
        assert self._session is not None and job.webhook_url is not None
        payload = self.status_body(job)
        for attempt in range(3):
            try:
                async with self._session.post(job.webhook_url, json=payload) as response:
                    ok = 200 <= response.status < 300
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            self.webhook_deliveries.append({"request_id": job.id, "status": payload["status"], "ok": ok})
            if ok:
                return
            await asyncio.sleep(0.1 * 2**attempt)

    # control API

    async def _control(self, request: web.Request) -> Any:
        if (refused := self._check_key(request)) is not None:
            raise web.HTTPUnauthorized(text=refused.text, content_type="application/json")
        return await request.json() if request.can_read_body else {}

    async def _control_calls(self, request: web.Request) -> web.StreamResponse:
        await self._control(request)
        return web.json_response([asdict(call) for call in self.calls])

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        await self._control(request)
        return web.json_response({"in_flight": self.in_flight(), "most_in_flight": self.most_in_flight,
                                  "over_capacity": self.over_capacity, "submits": len(self.calls_of("submit"))})

    async def _control_fault(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        try:
            self.add_fault(Fault(**body))
        except (TypeError, ValueError) as exc:
            return _error(400, "Bad Request", str(exc))
        return web.json_response({"faults": len(self.faults)})

    async def _control_outcomes(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        try:
            self.queue_outcomes(*body.get("outcomes", []))
        except ValueError as exc:
            return _error(400, "Bad Request", str(exc))
        return web.json_response({"outcomes": list(self.outcomes)})

    async def _control_settings(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        for name in ("queued_seconds", "processing_seconds", "edit_video_seconds"):
            if name in body:
                setattr(self.settings, name, type(getattr(self.settings, name))(body[name]))
        if "max_in_flight" in body:
            self.settings.max_in_flight = None if body["max_in_flight"] is None else int(body["max_in_flight"])
        return web.json_response({name: value for name, value in asdict(self.settings).items() if name != "key"})

    async def _control_finish(self, request: web.Request) -> web.StreamResponse:
        body = await self._control(request)
        try:
            self.finish(request.match_info["request_id"], body.get("outcome", "COMPLETED"))
        except KeyError:
            return _error(404, "Not Found", "Request not found")
        except ValueError as exc:
            return _error(400, "Bad Request", str(exc))
        return web.json_response({"finished": request.match_info["request_id"]})

    async def _control_forget(self, request: web.Request) -> web.StreamResponse:
        await self._control(request)
        try:
            self.forget(request.match_info["request_id"])
        except KeyError:
            return _error(404, "Not Found", "Request not found")
        return web.json_response({"forgotten": request.match_info["request_id"]})

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        await self._control(request)
        self.reset()
        return web.json_response({"reset": True})


def _error(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": title, "message": message}, status=status, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
