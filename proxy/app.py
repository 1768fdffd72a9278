"""The composition root: :func:`build_app` wires every part of the gateway, in one place.

Nothing inside the engine imports this module; the CLI and the tests do.
Policies and config are read and checked here, before the first request, so a
bad policy file or setting fails start-up instead of a request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from aiohttp import web

from .auth.tokens import Authenticator
from .config import Config, Secret
from .console import add_console
from .domain.budget import load_budget_rules, period_key
from .domain.cache import load_cache_rules
from .domain.catalog import Catalog, load_catalog
from .domain.clock import Clock
from .domain.errors import StoreUnavailable
from .domain.pricing import Pricer
from .domain.queueing import load_queue_rules
from .domain.views import TerminalAnswers
from .http.admin import add_admin_routes
from .http.observe import observe_middleware
from .http.openapi import build_openapi
from .http.problems import error_middleware
from .http.routes import add_routes
from .jobs.alerts import Alerts
from .jobs.dispatcher import Dispatcher
from .jobs.media import MediaStore
from .jobs.refresh import StatusRefresher
from .jobs.settle import Settler
from .jobs.sweeper import Sweeper
from .jobs.tracker import Tracker
from .jobs.upstream import Upstream
from .jobs.webhooks import WebhookSender, load_delivery_rules
from .net.prober import MediaProber
from .ops.metrics import Metrics, metrics_handler
from .ops.stopping import InFlight, StopBudget, stop_tasks
from .pipeline import PIPELINE, Pipeline
from .pipeline.s1_authenticate import Authenticate
from .pipeline.s2_validate import Validate
from .pipeline.s3_ratelimit import RateLimit
from .pipeline.s4_webhook import Webhook
from .pipeline.s5_idempotency import Idempotency
from .pipeline.s6_dedup import Dedup
from .pipeline.s7_price import Price
from .pipeline.s8_budget import Budget
from .pipeline.s9_forward import Forward, Record
from .services import SERVICES, Services
from .simulator.server import Simulator, SimulatorSettings
from .store import Store
from .store.factory import store_at

logger = logging.getLogger(__name__)

Context = Callable[[web.Application], AsyncIterator[None]]

#: Seconds of the stop budget kept back, at each step of a stop, for the steps after it (see ``build_app``).
AFTER_REQUESTS_SECONDS = 2.0
AFTER_BACKGROUND_SECONDS = 1.0
AFTER_CLIENTS_SECONDS = 0.5
#: The least any one close is given, even when the budget is spent: a close that cannot start leaks.
LEAST_CLOSE_SECONDS = 0.2
#: How long the side servers (the metrics port, the in-process simulator) wait for their own requests at a stop.
SIDE_SERVER_SHUTDOWN_SECONDS = 0.5  # aiohttp's own setting: up to twice this in all (httpserver.runner_shutdown_timeout)


def build_app(config: Config, *, clock: Clock | None = None) -> web.Application:
    """The gateway as an aiohttp application, ready for ``web.run_app`` or a test server.

    ``clock`` is where budget periods read the time (tests pass one they can move).
    """
    catalog = load_catalog(config.policies_dir)
    rules = load_budget_rules(config.policies_dir)
    cache_rules = load_cache_rules(config.policies_dir)
    delivery_rules = load_delivery_rules(config.policies_dir)
    queue_rules = load_queue_rules(config.policies_dir)
    clock = clock or Clock()
    contexts: list[Context] = []
    if config.simulate:
        config, simulator_context = _in_process_simulator(config, catalog)
        contexts.append(simulator_context)

    store = store_at(config.db_path, pool_size=config.db_pool_size)
    # Stopping (SIGTERM, or a test server's close) takes at most config.shutdown_seconds, in this order: the
    # listening sockets close; requests in flight get config.shutdown_request_seconds, then aiohttp cancels them
    # and they record their outcome (a submit cut short mid-call stays reserved as indeterminate for the sweeper);
    # background tasks are cancelled and waited for; clients close; the store closes last. Each step waits only
    # for what is left of the one budget, less what the steps after it keep back.
    stop_budget = StopBudget(config.shutdown_steps_seconds)
    in_flight = InFlight()
    metrics = Metrics()
    metrics.policy_loaded.set_to_current_time()
    metrics.policy_models.set(len(catalog.models))
    upstream = Upstream(
        config.upstream_url,
        config.upstream_key,
        timeout=config.upstream_timeout,
        connect_timeout=config.upstream_connect_timeout,
        metrics=metrics,
    )
    authenticator = Authenticator(config, store)
    prober = MediaProber(max_bytes=rules.probe_max_bytes, timeout=rules.probe_timeout_seconds,
                         allow_private=config.probe_allow_private, concurrency=rules.probe_concurrency)
    pricer = Pricer(prober, trust_input_probe=rules.trust_input_probe)
    alerts = Alerts(metrics, config.alert_webhook_url, stop_budget=stop_budget)
    dedup = Dedup(store, cache_rules, clock, metrics, config.base_url, rules.global_period)
    dispatcher = Dispatcher(store, upstream, catalog, queue_rules, metrics, stop_budget)
    pipeline = Pipeline(
        [
            Authenticate(authenticator),
            Validate(config.max_body_bytes),
            RateLimit(store),  # before anything that does outbound work or writes a handle, cache hits included
            Webhook(config.webhook_allow_private),
            Idempotency(store, cache_rules.idempotency_ttl_seconds, clock, config.base_url),
            dedup,
            Price(pricer),
            Budget(store, rules, clock),
            Record(store, alerts, metrics, join=dedup.join, rules=queue_rules, public_url=config.base_url,
                   queued=dispatcher.poke),
            Forward(upstream, config.base_url, store, queue_rules, metrics, queued=dispatcher.poke),
        ]
    )
    media = MediaStore(cache_rules.media_directory, max_bytes=cache_rules.media_max_bytes, public_url=config.base_url,
                       allow_private=config.probe_allow_private, max_files_per_job=cache_rules.media_max_files_per_job,
                       concurrency=cache_rules.media_concurrency) if cache_rules.keep_media else None
    settler = Settler(store, catalog, pricer, rules, media, metrics, alerts)
    refresher = StatusRefresher(store, upstream, settler, config.status_refresh_seconds)
    sweeper = Sweeper(store, refresher, rules, clock, metrics)
    tracker = Tracker(store, refresher, config.status_refresh_seconds, config.tracker_concurrency, metrics)

    async def store_figures() -> dict[str, list[tuple[dict[str, str], float]]]:
        now = clock.now()
        keys = {team.name: period_key(team.period, now) for team in await store.list_teams()}
        return await store.metric_figures(keys)

    metrics.watch_store(store_figures)
    sender = WebhookSender(store, delivery_rules, metrics, allow_private=config.webhook_allow_private)
    services = Services(
        catalog=catalog,
        store=store,
        authenticator=authenticator,
        refresher=refresher,
        rules=rules,
        clock=clock,
        metrics=metrics,
        alerts=alerts,
        tracker=tracker,
        terminal_answers=TerminalAnswers(),
    )

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        # The books are checked against the ledger once per start, beside serving rather than before it: the
        # check reads the whole ledger (seconds at a million rows), and what it finds is for an operator to read.
        check = asyncio.create_task(_check_books(store), name="ledger check")
        yield
        await stop_tasks([check], stop_budget.left(), "start-up check")
        await store.close(within=max(LEAST_CLOSE_SECONDS, stop_budget.left()))

    async def open_clients(app: web.Application) -> AsyncIterator[None]:
        clients = (authenticator, upstream, prober, alerts, sender, *((media,) if media else ()))
        for client in clients:
            await client.start()
        yield
        for client in reversed(clients):
            try:
                async with asyncio.timeout(max(LEAST_CLOSE_SECONDS, stop_budget.left(reserve=AFTER_CLIENTS_SECONDS))):
                    await client.close()
            except TimeoutError:
                logger.error("%s did not close in time; left open", type(client).__name__,
                             extra={"event": "shutdown.stuck", "task": type(client).__name__})

    async def run_background(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(sweeper.run(), name="sweeper"), asyncio.create_task(tracker.run(), name="tracker"),
                 asyncio.create_task(sender.run(), name="webhooks"),
                 asyncio.create_task(dispatcher.run(), name="dispatcher")]
        yield
        still = await in_flight.wait(stop_budget.left(reserve=AFTER_REQUESTS_SECONDS))
        if still:
            logger.warning("%d request(s) still in flight as the gateway stops", still, extra={"event": "shutdown.requests"})
        await stop_tasks(tasks, stop_budget.left(reserve=AFTER_BACKGROUND_SECONDS), "background task")
        await refresher.stop(max(LEAST_CLOSE_SECONDS, stop_budget.left(reserve=AFTER_BACKGROUND_SECONDS)))

    app = web.Application(
        middlewares=[observe_middleware(metrics, in_flight), error_middleware],
        client_max_size=config.max_body_bytes,
        # Room for a token up to the configured limit (in a header, or a Bearer header), so a token of
        # PROXY_MAX_TOKEN_BYTES arrives and an oversized one gets our 401, not the parser's 400.
        handler_args={"max_field_size": config.max_token_bytes + 1024, "max_line_size": config.max_token_bytes + 1024},
    )
    app[SERVICES] = services
    app[PIPELINE] = pipeline

    async def begin_stop(app: web.Application) -> None:
        stop_budget.begin()

    app.on_shutdown.append(begin_stop)
    app.cleanup_ctx.extend([*contexts, open_store, open_clients, run_background])
    if config.metrics_port:
        app.cleanup_ctx.append(_metrics_site(metrics, config.host, config.metrics_port))
    add_routes(app, services, pipeline.handler)
    add_admin_routes(app)
    add_console(app, session_seconds=config.console_session_seconds, public_url=config.base_url,
                upstream_url=config.upstream_url)
    if media is not None:
        app.router.add_get("/media/{name}", media.serve)
    document = build_openapi(catalog, media=media is not None)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    app.router.add_get("/openapi.json", openapi)
    return app


async def _check_books(store: Store) -> None:
    try:
        mismatches = await store.ledger_mismatches()
    except StoreUnavailable as exc:
        logger.warning("ledger check at start-up skipped: %s", exc.message)
        return
    for mismatch in mismatches:
        logger.error("budget totals differ from the ledger: %s", mismatch)
    if not mismatches:
        logger.info("ledger check at start-up: every total and rollup matches the ledger")


def _metrics_site(metrics: Metrics, host: str, port: int) -> Context:
    """``/metrics`` on a port of its own, for scrapers kept off the client port."""

    async def serve(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", metrics_handler(metrics))
        runner = web.AppRunner(metrics_app, access_log=None, shutdown_timeout=SIDE_SERVER_SHUTDOWN_SECONDS)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        logger.info("metrics on http://%s:%d/metrics", host, port)
        yield
        await runner.cleanup()

    return serve


def _in_process_simulator(config: Config, catalog: Catalog) -> tuple[Config, Context]:
    """Run the simulator on a loopback port of its own and point the gateway at it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = SimulatorSettings()
    if config.upstream_key:
        settings.key = config.upstream_key.reveal()
    simulator = Simulator(catalog, settings)
    config = replace(config, upstream_url=f"http://127.0.0.1:{port}", upstream_key=Secret(settings.key))

    async def run_simulator(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(simulator.build_app(), access_log=None, shutdown_timeout=SIDE_SERVER_SHUTDOWN_SECONDS)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        logger.info("simulated upstream listening on http://127.0.0.1:%d", port)
        yield
        await runner.cleanup()

    return config, run_simulator
