"""``token mint``, ``console link``, ``policies check`` and the ``simulator`` alone."""

from __future__ import annotations

import argparse
import asyncio
import os

from ..config import default_policies_dir, load_config
from ..domain.money import micros_to_usd
from ..ops.logs import configure_logging
from ..store import Store
from .common import CommandError, _policies_dir, _store_path, _with_store


def _simulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ..domain.catalog import load_catalog
    from ..simulator.server import Simulator, SimulatorSettings

    key = os.environ.get("PIXAZO_API_KEY", "").strip()
    if not key:
        raise CommandError("set PIXAZO_API_KEY: the key the simulator accepts (the gateways send it)")
    configure_logging("INFO", "json")
    simulator = Simulator(load_catalog(args.policies or default_policies_dir()), SimulatorSettings(key=key))
    web.run_app(simulator.build_app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def _console_link(args: argparse.Namespace) -> int:
    from ..console.signin import new_link, parse_ttl
    from ..store import ConsoleIdentity

    try:
        seconds = parse_ttl(args.ttl)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    user = args.user.strip()
    if not user or len(user) > 200:
        raise CommandError("--user must be a name of 1 to 200 characters")
    base = (args.public_url or os.environ.get("PROXY_PUBLIC_URL", "").strip()
            or f"http://{os.environ.get('PROXY_HOST', '').strip() or '127.0.0.1'}:"
               f"{os.environ.get('PROXY_PORT', '').strip() or '8080'}").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CommandError("--public-url must start with http:// or https://")

    async def work(store: Store) -> str:
        if await store.get_team(args.team) is None:
            raise CommandError(f"no team named {args.team!r}")
        return await new_link(store, ConsoleIdentity(args.team, user, args.admin), seconds)

    token = asyncio.run(_with_store(_store_path(args), work))
    print(f"{base}/console/login?token={token}")
    return 0


def _token_mint(args: argparse.Namespace) -> int:
    from ..auth.tokens import mint_token
    from ..config import SYMMETRIC_ALGORITHMS

    config = load_config(simulate=True)  # minting needs the JWT settings only, not the upstream key
    if not set(config.jwt_algorithms) & SYMMETRIC_ALGORITHMS:
        raise CommandError("token mint signs with PROXY_JWT_SECRET; this gateway is set up for public-key tokens")
    if args.ttl < 1:
        raise CommandError("--ttl must be at least 1 second")
    print(mint_token(config, team=args.team, user=args.user, ttl_seconds=args.ttl, admin=args.admin))
    return 0


def _policies_check(args: argparse.Namespace) -> int:
    from ..domain.budget import load_budget_rules
    from ..domain.cache import load_cache_rules
    from ..domain.catalog import load_catalog
    from ..domain.queueing import load_queue_rules
    from ..jobs.webhooks import load_delivery_rules

    directory = _policies_dir(args.dir)
    catalog = load_catalog(directory)
    rules = load_budget_rules(directory)
    load_cache_rules(directory)
    load_delivery_rules(directory)
    load_queue_rules(directory)
    wallet = f"global cap ${micros_to_usd(rules.global_limit_micros)} per {rules.global_period}" \
        if rules.global_limit_micros is not None else "no global cap"
    print(f"{directory}: ok ({len(catalog.models)} models: {', '.join(catalog.models)}; {wallet})")
    return 0
