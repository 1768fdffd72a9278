"""Client webhooks: ``X-Webhook-URL`` / ``X-Webhook-Mode``, delivered by the gateway itself.

At submit (the ``webhook`` policy, :mod:`proxy.pipeline.s4_webhook`) the URL must be https and every address
its host resolves to public (no loopback, private, link-local, CGNAT,
multicast or metadata addresses, IPv4-mapped forms included);
``PROXY_WEBHOOK_ALLOW_PRIVATE=1`` lifts both rules for local development.

Deliveries are rows of a persistent outbox, written by the store in the same
transaction as the status change they report: ``terminal`` handles get one at
the final status, ``sync`` handles one per observed change. The
:class:`WebhookSender` posts them with Standard Webhooks headers
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` =
``v1,base64(HMAC-SHA256(secret, id.timestamp.body))``), follows no redirects,
checks the address it actually connects to (the resolver refuses non-public
answers, so DNS rebinding is caught), and retries on the policy's schedule
with jitter, honouring ``Retry-After``, until it gives up and records why.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from ..domain.clock import iso_utc
from ..domain.errors import BadRequest, StoreUnavailable
from ..domain.headers import retry_after as retry_after_header
from ..domain.policyfile import read_toml
from ..domain.validate import url_problem
from ..net.guard import BlockedAddress, check_literal_host, is_public_address, literal_address, outbound_session
from ..ops.metrics import Metrics
from ..ops.stopping import stop_tasks, wait_event
from ..store import SECRET_PREFIX, Delivery, Store

logger = logging.getLogger(__name__)

WEBHOOKS_FILE = "webhooks.toml"
URL_HEADER = "X-Webhook-URL"
MODE_HEADER = "X-Webhook-Mode"
RESOLVE_TIMEOUT_SECONDS = 3.0
#: A claimed delivery is this process's for twice the delivery timeout plus this; a process that dies holding it
#: loses it then, and another delivers it (with the same webhook-id).
CLAIM_MARGIN_SECONDS = 1.0
#: How long a delivery cancelled at shutdown may take to unwind.
DELIVERY_CANCEL_SECONDS = 1.0
MAX_RETRY_AFTER_SECONDS = 36000


@dataclass(frozen=True)
class DeliveryRules:
    timeout_seconds: float = 10.0
    retry_schedule_seconds: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    poll_seconds: float = 1.0
    concurrency: int = 8
    per_team: int = 4
    per_host: int = 2


def load_delivery_rules(policies_dir: Path) -> DeliveryRules:
    root = read_toml(policies_dir / WEBHOOKS_FILE)
    delivery = root.table("delivery")
    schedule = delivery.raw("retry_schedule_seconds", list(DeliveryRules.retry_schedule_seconds))
    if not isinstance(schedule, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in schedule
    ):
        raise delivery.error("retry_schedule_seconds", "must be a list of waits in seconds, each at least 0")
    rules = DeliveryRules(
        timeout_seconds=delivery.number("timeout_seconds", 10.0),
        retry_schedule_seconds=tuple(float(v) for v in schedule),
        poll_seconds=delivery.number("poll_seconds", 1.0),
        concurrency=delivery.integer("concurrency", 8, minimum=1),
        per_team=delivery.integer("per_team", 4, minimum=1),
        per_host=delivery.integer("per_host", 2, minimum=1),
    )
    delivery.done()
    root.done()
    return rules


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery (Standard Webhooks, v1)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    content = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def check_target_form(url: str, *, allow_private: bool) -> None:
    """Refuse a webhook URL that is not a well-formed https URL (any scheme http(s) when private targets are allowed)."""
    problem = url_problem(url)
    if problem:
        raise BadRequest(f"{URL_HEADER} {problem}")
    if not allow_private and urlsplit(url).scheme != "https":
        raise BadRequest(f"{URL_HEADER} must be an https:// URL")


async def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse a webhook URL that is malformed, or whose host is or resolves to a non-public address."""
    check_target_form(url, allow_private=allow_private)
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = literal_address(host)
    if literal is not None:
        if not is_public_address(literal):
            raise BadRequest(f"{URL_HEADER} must point at a public address, not {host}")
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            answers = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (TimeoutError, OSError, UnicodeError):
        raise BadRequest(f"{URL_HEADER} host {host} cannot be resolved") from None
    if not answers or any(not is_public_address(str(answer[4][0])) for answer in answers):
        raise BadRequest(f"{URL_HEADER} must point at a public address; {host} resolves to a private one")


def _target(url: str) -> str:
    """The receiving service of a delivery: host and port."""
    parts = urlsplit(url)
    try:
        return f"{parts.hostname or ''}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    except ValueError:
        return parts.netloc


class WebhookSender:
    """Delivers due outbox rows, forever, as a background task.

    Each delivery runs as soon as it is due and there is room, never waiting for others to finish: at most
    ``concurrency`` at once, ``per_team`` of one team and ``per_host`` to one receiver (host and port). So a receiver that
    hangs (or a team flooding one) holds at most those slots for ``timeout_seconds`` each, and every other
    team's due deliveries start within a poll interval.
    """

    def __init__(self, store: Store, rules: DeliveryRules, metrics: Metrics, *, allow_private: bool) -> None:
        self.store = store
        self.rules = rules
        self.metrics = metrics
        self.allow_private = allow_private
        self.session: aiohttp.ClientSession | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._load: Counter[str] = Counter()  # in-flight deliveries per "team:<name>" and per "host:<name>"
        self._finished = asyncio.Event()

    async def start(self) -> None:
        self.session = outbound_session(allow_private=self.allow_private, timeout=self.rules.timeout_seconds,
                                        headers={"User-Agent": "pixazo-proxy-webhooks"})

    async def close(self) -> None:
        await stop_tasks(list(self._running.values()), DELIVERY_CANCEL_SECONDS, "webhook delivery")
        if self.session is not None:
            await self.session.close()

    async def run(self) -> None:
        """Deliver until cancelled; then the deliveries under way are cancelled too.

        A delivery cancelled mid-POST keeps its claim until ``claimed_until``, and is then tried again by this
        process after its restart or by another: at least once, with the same ``webhook-id``.
        """
        try:
            await self._loop()
        finally:
            await stop_tasks(list(self._running.values()), DELIVERY_CANCEL_SECONDS, "webhook delivery")

    async def _loop(self) -> None:
        while True:
            try:
                await self.dispatch()
            except StoreUnavailable as exc:  # the database is away: deliveries wait in the outbox meanwhile
                logger.warning("webhook dispatch skipped: %s", exc.message)
            except Exception:
                logger.exception("webhook dispatch failed")
            self._finished.clear()
            # Look again when a delivery ends (room freed, or its handle's next one is due) or after a poll.
            await wait_event(self._finished, self.rules.poll_seconds)

    async def dispatch(self) -> int:
        """Start every due delivery there is room for, without waiting for any; how many started.

        One delivery per handle at a time (the head of its queue), so each handle hears its statuses in order.
        """
        if len(self._running) >= self.rules.concurrency:
            return 0
        now = datetime.now(UTC)
        claim_until = iso_utc(now + timedelta(seconds=2 * self.rules.timeout_seconds + CLAIM_MARGIN_SECONDS))
        due = await self.store.due_deliveries(iso_utc(now), per_team=self.rules.per_team, skip=tuple(self._running),
                                              claim_until=claim_until)  # no other replica is given these meanwhile
        started = 0
        unstarted: list[int] = []
        for delivery in due:
            team, host = f"team:{delivery.team}", f"host:{_target(delivery.url)}"
            if len(self._running) >= self.rules.concurrency or delivery.id in self._running \
                    or self._load[team] >= self.rules.per_team or self._load[host] >= self.rules.per_host:
                unstarted.append(delivery.id)
                continue
            self._load.update((team, host))
            task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.id}")
            self._running[delivery.id] = task
            task.add_done_callback(functools.partial(self._done, delivery.id, (team, host)))
            started += 1
        if unstarted:  # no room here now: let any process (this one included) take them at once
            await self.store.release_claims(tuple(unstarted))
        return started

    def _done(self, delivery_id: int, keys: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._running.pop(delivery_id, None)
        self._load.subtract(keys)
        self._finished.set()

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            await self._attempt(delivery)
        except Exception:  # the row stays pending and is tried again; say why
            logger.exception("webhook %s for %s could not be attempted", delivery.message_id, delivery.handle)

    async def _attempt(self, delivery: Delivery) -> None:
        attempts = delivery.attempts + 1
        ok, error, retry_after = await self._post(delivery)
        if ok:
            await self.store.delivery_done(delivery.id, delivered=True, attempts=attempts,
                                           next_attempt_at=None, error=None)
            self.metrics.child(self.metrics.webhook_deliveries, "delivered").inc()
            return
        schedule = self.rules.retry_schedule_seconds
        if attempts > len(schedule):
            await self.store.delivery_done(delivery.id, delivered=False, attempts=attempts,
                                           next_attempt_at=None, error=error)
            self.metrics.child(self.metrics.webhook_deliveries, "failed").inc()
            logger.error("webhook %s for %s given up after %d attempts: %s", delivery.message_id,
                         delivery.handle, attempts, error)
            return
        wait = schedule[attempts - 1] * random.uniform(1.0, 1.2)
        wait = max(wait, min(retry_after or 0.0, MAX_RETRY_AFTER_SECONDS))
        next_at = iso_utc(datetime.now(UTC) + timedelta(seconds=wait))
        await self.store.delivery_done(delivery.id, delivered=False, attempts=attempts,
                                       next_attempt_at=next_at, error=error)
        self.metrics.child(self.metrics.webhook_deliveries, "retried").inc()
        logger.warning("webhook %s for %s attempt %d failed (%s); next in %.1fs", delivery.message_id,
                       delivery.handle, attempts, error, wait)

    async def _post(self, delivery: Delivery) -> tuple[bool, str | None, float | None]:
        """(delivered, error, Retry-After seconds) of one attempt."""
        assert self.session is not None, "sender is not started"
        body = delivery.payload.encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(await self.store.webhook_secret(delivery.team), delivery.message_id,
                                      timestamp, body),
        }
        try:
            check_literal_host(delivery.url, allow_private=self.allow_private)
            async with self.session.post(delivery.url, data=body, headers=headers, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return True, None, None
                wait = retry_after_header(response.headers.get("Retry-After"))
                return False, f"HTTP {response.status}", float(wait) if wait is not None and wait.isdigit() else None
        except BlockedAddress as exc:
            return False, f"blocked: {exc}", None
        except (TimeoutError, aiohttp.ClientError) as exc:
            return False, f"{type(exc).__name__}: {exc}"[:300], None

