"""The benchmark's other two servers, each run as its own process.

    python -m tests.bench.servers simulator --port P --key K
    python -m tests.bench.servers passthrough --port P --upstream URL
    (either with --loop uvloop to run on uvloop, as the gateway can)

``passthrough`` is the floor for any Python proxy: a few lines of aiohttp that
forward method, path, headers and body to the upstream over one session.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.catalog import load_catalog
from proxy.simulator import Simulator, SimulatorSettings

ROOT = Path(__file__).resolve().parents[2]
HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}


def passthrough_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):  # one pooled session, like any real proxy
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with app["session"].request(request.method, upstream + request.path_qs, headers=headers,
                                          data=await request.read()) as response:
            return web.Response(status=response.status, body=await response.read(),
                                content_type=response.content_type)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("simulator", "passthrough"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="bench-upstream-key")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.kind == "simulator":
        settings = SimulatorSettings(key=args.key, queued_seconds=0.0, processing_seconds=0.0)
        app = Simulator(load_catalog(ROOT / "policies"), settings).build_app()
    else:
        app = passthrough_app(args.upstream.rstrip("/"))
    loop = None
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
