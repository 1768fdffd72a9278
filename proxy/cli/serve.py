"""``pixazo-proxy serve``: the gateway, in this process or in N workers sharing its port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from ..config import Config, load_config
from ..ops.logs import configure_logging
from .common import CommandError

logger = logging.getLogger("proxy.cli")  # the command's one logger name, as in proxy/cli/__init__.py


#: Set in each worker process ``serve --workers N`` starts (its index); the port is then shared (SO_REUSEPORT).
WORKER_ENV = "PROXY_WORKER_INDEX"


def _serve(args: argparse.Namespace) -> int:
    from ..app import build_app
    from ..http.server import run

    workers = args.workers if args.workers is not None else int(os.environ.get("PROXY_WORKERS", "1") or "1")
    if workers < 1 or workers > 64:
        raise CommandError("--workers must be from 1 to 64")
    config = load_config(
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        upstream_url=args.upstream,
        db_path=args.db,
        policies_dir=args.policies,
        simulate=args.simulate,
        metrics_port=args.metrics_port,
    )
    if workers > 1:  # the config is checked once here, so a bad setting fails once, not in every worker
        from ..ops.workers import supervise

        return supervise(workers, sys.argv[1:], stop_seconds=config.shutdown_seconds)
    configure_logging(config.log_level, config.log_format)
    app = build_app(config)
    logger.info(
        "pixazo-proxy listening on %s (upstream: %s)", config.base_url,
        "in-process simulator" if config.simulate else config.upstream_url,
    )
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish (half of PROXY_SHUTDOWN_SECONDS), then run
    # the cleanup contexts: background tasks stop, clients close, the store closes last; all within the bound.
    run(app, host=config.host, port=config.port, loop=_event_loop(config),
        request_seconds=config.shutdown_request_seconds, reuse_port=os.environ.get(WORKER_ENV) is not None)
    logger.info("pixazo-proxy stopped", extra={"event": "shutdown"})
    return 0


def _event_loop(config: Config) -> asyncio.AbstractEventLoop:
    if config.uses_uvloop:
        import uvloop

        logger.info("event loop: uvloop %s", uvloop.__version__)
        return uvloop.new_event_loop()
    logger.info("event loop: asyncio")
    return asyncio.new_event_loop()
