"""The benchmark's other two servers, each run as its own process.

    python -m tests.bench.servers simulator --port P --key K
    python -m tests.bench.servers passthrough --port P --upstream URL
    python -m tests.bench.servers durable --port P --upstream URL --db PATH [--synchronous NORMAL]
    (either with --loop uvloop to run on uvloop, as the gateway can)

``passthrough`` is the floor for any Python proxy: a few lines of aiohttp that
forward method, path, headers and body to the upstream over one session.
``durable`` is the floor for a proxy that must not lose a submit: the same pass-through plus the two
durable writes any such proxy makes per submit (a record before the upstream call, so a crash or power loss
after the upstream accepted the job still finds it; the upstream's id after it), through the gateway's own
group-commit writer and checkpoint thread, with the gateway's settings (WAL, ``synchronous=FULL``), and
nothing else.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.domain.catalog import load_catalog
from proxy.simulator.server import Simulator, SimulatorSettings
from proxy.store.checkpoint import Checkpointer
from proxy.store.writer import GroupCommitWriter

ROOT = Path(__file__).resolve().parents[2]
HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}


async def session_ctx(app: web.Application):  # one pooled session, like any real proxy
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["session"].close()


def forwarded_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def passthrough_app(upstream: str) -> web.Application:
    app = web.Application()

    async def forward(request: web.Request) -> web.Response:
        headers = forwarded_headers(request)
        async with app["session"].request(request.method, upstream + request.path_qs, headers=headers,
                                          data=await request.read()) as response:
            return web.Response(status=response.status, body=await response.read(),
                                content_type=response.content_type)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def durable_app(upstream: str, db_path: str, synchronous: str = "FULL") -> web.Application:
    app = web.Application()

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("CREATE TABLE IF NOT EXISTS submits (id INTEGER PRIMARY KEY, body BLOB, answer BLOB)")
        return db

    def connect_writer() -> sqlite3.Connection:  # as the gateway's store: checkpoints on their own thread
        db = connect()
        db.execute("PRAGMA wal_autocheckpoint = 0")
        return db

    async def writer_ctx(app: web.Application):
        app["writer"] = GroupCommitWriter(connect_writer)
        await app["writer"].start()
        checkpointer = Checkpointer(connect)
        checkpointer.start()
        yield
        checkpointer.stop()
        await app["writer"].stop()

    async def forward(request: web.Request) -> web.Response:
        headers = forwarded_headers(request)
        body = await request.read()
        row = await app["writer"].submit(lambda db: db.execute("INSERT INTO submits (body) VALUES (?)", (body,)).lastrowid)
        async with app["session"].request("POST", upstream + request.path_qs, headers=headers, data=body) as response:
            answer = await response.read()
        await app["writer"].submit(lambda db: db.execute("UPDATE submits SET answer = ? WHERE id = ?", (answer, row)))
        return web.Response(status=response.status, body=answer, content_type=response.content_type)

    app.cleanup_ctx.extend([session_ctx, writer_ctx])
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("simulator", "passthrough", "durable"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="bench-upstream-key")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--db", default="", help="durable: the SQLite file it writes")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        help="durable: FULL survives a power cut (the gateway's setting), NORMAL only a process crash")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.kind == "simulator":
        settings = SimulatorSettings(key=args.key, queued_seconds=0.0, processing_seconds=0.0)
        app = Simulator(load_catalog(ROOT / "policies"), settings).build_app()
    elif args.kind == "durable":
        app = durable_app(args.upstream.rstrip("/"), args.db, args.synchronous)
    else:
        app = passthrough_app(args.upstream.rstrip("/"))
    loop = None
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
