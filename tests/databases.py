"""Databases for tests: a SQLite file, or a PostgreSQL database of its own per test.

PostgreSQL comes from ``PROXY_TEST_POSTGRES_URL`` when it is set (CI machines run PostgreSQL 15 on
127.0.0.1:5432); otherwise a throwaway cluster is started from the installed server binaries (``initdb`` in a
temporary directory, a free port) and stopped at the end of the run; if neither is possible, the PostgreSQL
half of the suite is skipped and the reason printed. Each test gets a database created from a migrated template
and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shlex
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

POSTGRES_ENV = "PROXY_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


#: What to do when the PostgreSQL half cannot run: said once, at the top of the run (tests/skip_guard.py).
POSTGRES_HOW = (f"set {POSTGRES_ENV}=postgresql://USER@HOST:PORT/DATABASE (a server the tests may create databases "
                "on), or install PostgreSQL's server binaries (Debian: apt-get install postgresql) so the tests start "
                "a throwaway cluster; as root that also needs a 'postgres' user and runuser (util-linux) or su on PATH")


def server_binaries() -> Path | None:
    """The folder of the newest installed PostgreSQL server binaries (initdb, pg_ctl), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")]
                                                                     if shutil.which("initdb") else [])
    return Path(found[-1]).parent if found else None


def as_postgres_user() -> list[str] | None:
    """The words that run a command as the ``postgres`` user (initdb refuses root); None if nothing can.

    ``[]`` when not root. As root: ``runuser``, else ``su`` (which takes one shell command: see ``_command``).
    """
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if shutil.which("su"):
        return ["su", "postgres", "-s", "/bin/sh", "-c"]
    return None


def cluster_problem() -> str | None:
    """Why no throwaway cluster can start here, or None (checked without starting one)."""
    if server_binaries() is None:
        return "no PostgreSQL server binaries (initdb) are installed"
    if as_postgres_user() is None:
        return "running as root, and there is no 'postgres' user, or neither runuser nor su, to run a cluster as"
    return None


class ThrowawayCluster:
    """A PostgreSQL cluster of the installed binaries in a temporary directory, for one test run."""

    def __init__(self) -> None:
        problem = cluster_problem()
        binaries, as_user = server_binaries(), as_postgres_user()
        if problem is not None or binaries is None or as_user is None:
            raise RuntimeError(problem)
        self.bin = binaries
        self.directory = Path(tempfile.mkdtemp(prefix="pixazo-pg-"))
        self.port = _free_port()
        self.as_user = as_user
        if as_user:
            shutil.chown(self.directory, "postgres")
        data = self.directory / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.start_server()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start_server(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-l", str(self.directory / "log"),
                  "-w", "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop_server(self) -> None:
        """Stop the server (fast shutdown: connections are cut), keeping its data for ``start_server``."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")

    def _run(self, *command: str) -> None:
        subprocess.run(self._command(command), check=True, capture_output=True, timeout=60)

    def _command(self, command: tuple[str, ...]) -> list[str]:
        if self.as_user[:1] == ["su"]:  # su runs one shell command line
            return [*self.as_user, shlex.join(command)]
        return [*self.as_user, *command]

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL server for the run: a migrated template, and a fresh database per test made from it."""

    def __init__(self, url: str, cluster: ThrowawayCluster | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self.template = f"pixazo_template_{uuid.uuid4().hex[:10]}"
        self._admin(f"CREATE DATABASE {self.template}")
        _migrate(with_database(url, self.template))

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(statement)

    def create(self) -> str:
        name = f"pixazo_test_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return with_database(self.url, name)

    def drop(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {urlsplit(url).path.lstrip('/')} WITH (FORCE)")

    def close(self) -> None:
        try:
            self._admin(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
        finally:
            if self.cluster is not None:
                self.cluster.stop()


def _migrate(url: str) -> None:
    """Open (and so migrate) a store at ``url``, on a loop of its own (a test's loop may be running)."""
    from proxy.store.factory import store_at

    async def migrate() -> None:
        store = store_at(url, pool_size=1)
        await store.open()
        await store.close()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(migrate())
        except BaseException as error:  # noqa: BLE001  (re-raised in the caller's thread)
            failure.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def start_postgres() -> tuple[PostgresServer | None, str]:
    """The run's PostgreSQL server, or None and why there is none."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if url:
        try:
            return PostgresServer(url), f"{POSTGRES_ENV}={_without_password(url)}"
        except Exception as error:  # noqa: BLE001  (reported as the reason the PostgreSQL half is skipped)
            return None, f"{POSTGRES_ENV} is set but unusable: {type(error).__name__}: {error}"
    try:
        cluster = ThrowawayCluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return None, f"{POSTGRES_ENV} is not set and no throwaway cluster could start: {error} {detail[-300:]!r}"
    try:
        return PostgresServer(cluster.url, cluster), f"a throwaway cluster on port {cluster.port}"
    except Exception as error:  # noqa: BLE001
        cluster.stop()
        return None, f"the throwaway cluster did not take the schema: {error}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


class Peek:
    """Synchronous SQL on the gateway's database, for assertions and conditions: sqlite3 or psycopg."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.postgres = location.startswith(("postgres://", "postgresql://"))

    def _text(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s") if self.postgres else sql

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.postgres:
            import psycopg

            with psycopg.connect(self.location, autocommit=True) as connection:
                return [tuple(row) for row in connection.execute(self._text(sql), params).fetchall()]
        with sqlite3.connect(self.location, timeout=30) as connection:
            return connection.execute(sql, params).fetchall()

    def execute(self, sql: str, *params: Any) -> int:
        """Run one changing statement, committed; how many rows it changed."""
        if self.postgres:
            import psycopg

            with psycopg.connect(self.location, autocommit=True) as connection:
                return connection.execute(self._text(sql), params).rowcount
        connection = sqlite3.connect(self.location, timeout=30)
        try:
            with connection:
                return connection.execute(sql, params).rowcount
        finally:
            connection.close()


def wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    """Block until PostgreSQL at ``url`` answers (after a restart in a fault test)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
