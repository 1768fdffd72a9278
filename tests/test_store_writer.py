"""Group commit: writes queued together share one COMMIT, and each is still all or nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.domain.errors import StoreUnavailable
from proxy.store.checkpoint import WAL_SIZE_LIMIT
from proxy.store.sqlite import SQLiteStore
from proxy.store.writer import MAX_BATCH, GroupCommitWriter
from tests.conftest import until


def connector(path: Path):
    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
        return db
    return connect


def rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]


def insert(n: int):
    def fn(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t (n) VALUES (?)", (n,))
        return n
    return fn


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[GroupCommitWriter]:
    """A started writer on ``tmp_path / "w.db"``, stopped after the test."""
    started = GroupCommitWriter(connector(tmp_path / "w.db"))
    await started.start()
    yield started
    await started.stop()


async def hold_writer(writer: GroupCommitWriter) -> tuple[asyncio.Future[int], threading.Event]:
    """A write that blocks the writer thread until released, so what is queued meanwhile forms one batch."""
    started, release = threading.Event(), threading.Event()

    def blocker(db: sqlite3.Connection) -> int:
        started.set()
        release.wait(10)
        db.execute("INSERT INTO t (n) VALUES (0)")
        return 0

    future = writer.submit(blocker)
    assert await asyncio.to_thread(started.wait, 10)
    return future, release


async def test_queued_writes_share_one_commit_and_a_failure_keeps_nothing_of_its_own(
        tmp_path: Path, writer: GroupCommitWriter) -> None:
    first, release = await hold_writer(writer)

    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (n) VALUES (500)")
        raise ValueError("refused after writing")

    futures = [writer.submit(insert(n)) for n in range(1, 21)]
    failing = writer.submit(half_then_fail)
    futures += [writer.submit(insert(n)) for n in range(21, 41)]
    release.set()
    assert await first == 0
    assert await asyncio.gather(*futures) == list(range(1, 41))
    with pytest.raises(ValueError, match="refused after writing"):
        await failing
    assert writer.commits == 2  # the held write, then the 41 queued behind it together
    assert rows(tmp_path / "w.db") == list(range(0, 41))  # 500 rolled back to its savepoint


async def test_a_batch_is_capped_so_the_write_lock_is_never_held_for_long(
        tmp_path: Path, writer: GroupCommitWriter) -> None:
    first, release = await hold_writer(writer)
    futures = [writer.submit(insert(n)) for n in range(1, MAX_BATCH * 2 + 2)]
    release.set()
    await first
    await asyncio.gather(*futures)
    assert writer.commits == 1 + 3  # 129 queued writes: 64 + 64 + 1
    assert len(rows(tmp_path / "w.db")) == MAX_BATCH * 2 + 2


async def test_a_transaction_sqlite_abandons_fails_the_writes_it_carried_and_not_later_ones(
        tmp_path: Path, writer: GroupCommitWriter) -> None:
    first, release = await hold_writer(writer)

    def abandon(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (n) VALUES (600)")
        db.execute("ROLLBACK")  # what SQLite itself does on SQLITE_FULL or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    before = [writer.submit(insert(n)) for n in (1, 2, 3)]
    failing = writer.submit(abandon)
    after = [writer.submit(insert(n)) for n in (4, 5)]
    release.set()
    await first
    for future in (*before, failing):
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await future
    assert await asyncio.gather(*after) == [4, 5]
    assert rows(tmp_path / "w.db") == [0, 4, 5]  # what was reported as failed was indeed not kept


async def test_writes_queued_before_stop_are_finished_and_later_ones_refused(
        tmp_path: Path, writer: GroupCommitWriter) -> None:
    futures = [writer.submit(insert(n)) for n in range(1, 11)]
    await writer.stop()
    assert [f.result() for f in futures] == list(range(1, 11))
    with pytest.raises(RuntimeError, match="not open"):
        writer.submit(insert(99))
    assert rows(tmp_path / "w.db") == list(range(1, 11))


async def test_checkpoints_run_off_the_writer_and_keep_the_wal_bounded(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    store = SQLiteStore(path, checkpoint_seconds=0.05)
    await store.open()
    try:
        assert await store._writer.submit(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        await store.create_team("design", 1_000_000, "month")
        sizes = []
        for round_ in range(4):
            await asyncio.gather(*(store.update_team("design", soft_threshold_percent=1 + (round_ * 300 + n) % 99)
                                   for n in range(300)))
            checkpoints = store._checkpointer.checkpoints
            deadline = asyncio.get_running_loop().time() + 5
            while store._checkpointer.checkpoints < checkpoints + 2:  # one caught up since these writes
                assert asyncio.get_running_loop().time() < deadline, "no checkpoint ran"
                await asyncio.sleep(0.02)
            sizes.append((tmp_path / "wal.db-wal").stat().st_size)
        assert store._checkpointer.pages_copied > 0
        assert sizes[-1] <= sizes[0]  # the WAL starts over after each checkpoint instead of growing
        with sqlite3.connect(path) as other:  # and what was checkpointed is in the database file
            assert other.execute("SELECT soft_threshold_percent FROM teams").fetchone()[0] == 1 + (3 * 300 + 299) % 99
    finally:
        await store.close()


def release_the_writers_savepoint(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO t (n) VALUES (99)")
    db.execute("RELEASE w")  # the writer's own RELEASE then fails: the statement that used to end its thread


async def test_a_write_that_breaks_the_transaction_is_answered_and_the_writer_carries_on(
        writer: GroupCommitWriter, tmp_path: Path) -> None:
    blocked, release = await hold_writer(writer)  # so the next three queue up as one batch
    futures = [writer.submit(insert(1)), writer.submit(release_the_writers_savepoint), writer.submit(insert(2))]
    release.set()
    await blocked
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)  # never left waiting

    assert all(isinstance(result, sqlite3.Error) for result in results)  # one transaction: none of it kept
    assert rows(tmp_path / "w.db") == [0]
    assert await writer.submit(insert(3)) == 3
    assert writer.healthy and rows(tmp_path / "w.db") == [0, 3]


async def test_a_writer_that_cannot_reopen_its_database_fails_every_write_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "volume"
    directory.mkdir()
    writer = GroupCommitWriter(connector(directory / "w.db"))
    await writer.start()
    try:
        def lose_the_volume(db: sqlite3.Connection) -> None:
            db.close()
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()

        with pytest.raises(sqlite3.ProgrammingError):
            await asyncio.wait_for(writer.submit(lose_the_volume), 10)
        with pytest.raises(StoreUnavailable) as refused:
            await asyncio.wait_for(writer.submit(insert(1)), 5)

        assert not writer.healthy
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "30"
    finally:
        await writer.stop()


async def test_a_write_lock_held_elsewhere_is_waited_for_then_refused_with_503(writer: GroupCommitWriter,
                                                                              tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    other.execute("BEGIN IMMEDIATE")  # a CLI command in the middle of its write
    try:
        held = writer.submit(insert(1))
        released = asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        assert await held == 1  # waited for the lock, within busy_timeout
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as refused:
            await writer.submit(insert(2))  # held past busy_timeout: 503, not a 500
        assert refused.value.headers["Retry-After"] == "2" and writer.healthy
        released.cancel()
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    assert await writer.submit(insert(3)) == 3


async def test_a_wal_grown_behind_a_long_read_is_given_back_once_the_store_is_idle(tmp_path: Path) -> None:
    path = tmp_path / "grow.db"
    store = SQLiteStore(path, checkpoint_seconds=0.05)
    await store.open()
    try:
        assert await store._writer.submit(lambda db: db.execute("PRAGMA journal_size_limit").fetchone()[0]) == WAL_SIZE_LIMIT
        await store.create_team("design", 1_000_000, "month")
        report = sqlite3.connect(path)  # a long spend report: its snapshot keeps checkpoints from catching up
        report.execute("BEGIN")
        report.execute("SELECT COUNT(*) FROM teams").fetchone()
        await asyncio.gather(*(store.update_team("design", soft_threshold_percent=1 + n % 99) for n in range(600)))
        grown = (tmp_path / "grow.db-wal").stat().st_size
        report.execute("COMMIT")
        report.close()

        # idle: TRUNCATE (the counter moves just after the file shrinks: wait for both)
        await until(lambda: (tmp_path / "grow.db-wal").stat().st_size == 0 and store._checkpointer.truncations >= 1,
                    timeout=10)

        assert grown > 100_000
    finally:
        await store.close()


async def test_a_write_alone_in_its_batch_commits_or_keeps_nothing_without_a_savepoint(
        tmp_path: Path, writer: GroupCommitWriter) -> None:
    statements: list[str] = []

    def half_then_fail(db: sqlite3.Connection) -> None:
        db.set_trace_callback(statements.append)
        db.execute("INSERT INTO t (n) VALUES (500)")
        raise ValueError("refused after writing")

    with pytest.raises(ValueError, match="refused after writing"):
        await writer.submit(half_then_fail)
    assert await writer.submit(insert(7)) == 7
    commits = writer.commits

    assert rows(tmp_path / "w.db") == [7]  # the lone failure rolled back whole, the next write committed
    assert commits == 1 and not [s for s in statements if s.startswith(("SAVEPOINT", "RELEASE"))]
    assert statements[-1] == "COMMIT"  # the traced connection saw the rollback, then 7's insert and commit
