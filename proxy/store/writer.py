"""The store's writer: one thread, one connection, group commit.

Every write is a function ``fn(db)`` that must be atomic on its own. Callers
on the event loop hand them over without blocking; the writer thread takes
whatever has queued up (at most :data:`MAX_BATCH`), runs each inside a
``SAVEPOINT`` of one ``BEGIN IMMEDIATE`` transaction (a write alone in its batch
needs none: its failure rolls back the transaction), commits once, and only
then answers every caller, with a single wake-up of the event loop::

    BEGIN IMMEDIATE
      SAVEPOINT w; fn1(db); RELEASE w        -> fn1's result
      SAVEPOINT w; fn2(db) raises; ROLLBACK TO w; RELEASE w  -> fn2's error, nothing of it kept
      ...
    COMMIT                                   -> results delivered (or, if COMMIT fails, its error to all)

So concurrent submits share one commit (one fsync with ``synchronous=FULL``)
and one thread hand-off each way, and each still commits all or nothing, in
the order it was queued. A caller learns of success only once its changes are
durable. If SQLite abandons the whole transaction (disk full, I/O error), every
function of that batch is answered with the error: none of them was kept.

The thread never dies with callers waiting. Whatever fails while running a
batch (a SAVEPOINT, a RELEASE, a ROLLBACK, the connection itself), every caller
of that batch is answered with an error, the transaction is rolled back, and
the connection is reopened if it is broken; if it cannot be reopened the writer
is *failed*: it answers every later write with :class:`StoreUnavailable` at
once and :attr:`healthy` is False (``/readyz`` answers 503). When another
process (the CLI) holds the write lock past ``busy_timeout``, the batch is
answered with :class:`StoreUnavailable` (503, ``Retry-After``), not a 500.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..domain.errors import StoreUnavailable
from ..ops.stopping import join_thread

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The most functions one commit carries; bounds how long the write lock is held.
MAX_BATCH = 64

_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]
_Work = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", bool]


class GroupCommitWriter:
    """Runs write functions on one thread and connection, committing concurrent ones together."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], *, name: str = "store-writer") -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened: asyncio.Future[None] | None = None
        self.commits = 0  # batches committed (tests read it)
        self.failure: BaseException | None = None  # why the writer cannot write any more, once it cannot

    @property
    def healthy(self) -> bool:
        """The thread runs and its connection works."""
        return self._thread.is_alive() and self.failure is None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._opened = self._loop.create_future()
        self._thread.start()
        await self._opened

    async def stop(self, within: float = 5.0) -> bool:
        """Finish what is queued, close the connection and end the thread; whether it ended within ``within``.

        A batch still running at the deadline commits or rolls back whole on the thread, which is a daemon and
        ends with the process.
        """
        if not self._thread.is_alive():
            return True
        self._queue.put(None)
        return await join_thread(self._thread.join, within)

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True) -> asyncio.Future[T]:
        """Queue ``fn(db)``; the future resolves once it is committed (or with its error, nothing kept).

        ``transaction=False`` runs ``fn`` outside any transaction, alone (for reads of a ``:memory:`` store).
        """
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, future, transaction))
        return future

    # the writer thread

    def _run(self) -> None:
        assert self._loop is not None and self._opened is not None
        db: sqlite3.Connection | None
        try:
            db = self._connect()
        except BaseException as error:  # noqa: BLE001 - handed to start()'s caller
            self._loop.call_soon_threadsafe(_settle, [(self._opened, None, error)])
            return
        self._loop.call_soon_threadsafe(_settle, [(self._opened, None, None)])
        stopping = False
        while not stopping:
            work = self._queue.get()
            if work is None:
                break
            batch = [work]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            if self.failure is not None:
                self._loop.call_soon_threadsafe(_settle, [(future, None, _unavailable(self.failure))
                                                          for _, future, _ in batch])
                continue
            outcomes: list[_Outcome] = []
            try:
                assert db is not None
                self._run_batch(db, batch, outcomes)
            except BaseException as error:  # noqa: BLE001 - every caller hears of it, then the writer recovers
                logger.error("the store writer failed while running %d writes: %s", len(batch), error)
                answered = {id(future) for future, _, _ in outcomes}  # committed before the failure: they stand
                outcomes += [(future, None, error) for _, future, _ in batch if id(future) not in answered]
                db = self._recover(db)
            self._loop.call_soon_threadsafe(_settle, outcomes)
        if db is not None:
            db.close()

    def _run_batch(self, db: sqlite3.Connection, batch: list[_Work], outcomes: list[_Outcome]) -> None:
        """Run ``batch``, adding each caller's outcome to ``outcomes`` once it is final (committed or refused)."""
        pending: list[_Work] = []
        for work in batch:
            fn, future, transaction = work
            if transaction:
                pending.append(work)
            else:  # commit what came before it, then run it alone
                outcomes.extend(self._commit(db, pending))
                pending = []
                outcomes.append(_call(fn, db, future))
        outcomes.extend(self._commit(db, pending))

    def _recover(self, db: sqlite3.Connection | None) -> sqlite3.Connection | None:
        """After a failed batch: roll back and keep the connection, or reopen it; failed if neither works."""
        try:
            assert db is not None
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.execute("SELECT 1").fetchone()
            return db
        except BaseException as error:  # noqa: BLE001 - a broken connection: reopen it below
            logger.warning("the store writer's connection is broken (%s); reopening it", error)
        try:
            if db is not None:
                db.close()
        except sqlite3.Error:
            pass
        try:
            return self._connect()
        except BaseException as error:  # noqa: BLE001 - recorded; every later write hears of it
            logger.critical("the store writer cannot reopen the database, no write can succeed: %s", error)
            self.failure = error
            return None

    def _commit(self, db: sqlite3.Connection, batch: list[_Work]) -> list[_Outcome]:
        if not batch:
            return []
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            logger.warning("the store is busy: another process has held its write lock past the wait; %d writes "
                           "refused with 503", len(batch), extra={"event": "store.busy"})
            busy = StoreUnavailable("The gateway's store is busy (another process holds its write lock); "
                                    "nothing was recorded or reserved. Retry shortly.")
            return [(future, None, busy) for _, future, _ in batch]
        if len(batch) == 1:  # alone in its transaction: no savepoint to keep it apart from others
            return self._commit_one(db, batch[0])
        outcomes: list[_Outcome] = []
        for fn, future, _ in batch:
            db.execute("SAVEPOINT w")
            try:
                result = fn(db)
            except BaseException as error:  # noqa: BLE001 - handed to this function's caller
                if not db.in_transaction:  # SQLite abandoned the whole transaction: nothing of this batch is kept
                    logger.error("a write transaction was abandoned by SQLite: %s", error)
                    kept = [(f, None, error) for f, _, _ in outcomes] + [(future, None, error)]
                    rest = batch[len(outcomes) + 1:]
                    return kept + self._commit(db, rest)
                db.execute("ROLLBACK TO w")
                db.execute("RELEASE w")
                outcomes.append((future, None, error))
                continue
            db.execute("RELEASE w")
            outcomes.append((future, result, None))
        try:
            db.execute("COMMIT")
        except sqlite3.Error as error:
            logger.error("a group commit of %d writes failed: %s", len(batch), error)
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(future, None, error) for future, _, _ in outcomes]
        self.commits += 1
        return outcomes


    def _commit_one(self, db: sqlite3.Connection, work: _Work) -> list[_Outcome]:
        """One write in a transaction of its own (BEGIN IMMEDIATE already run): committed, or rolled back whole."""
        fn, future, _ = work
        try:
            result = fn(db)
        except BaseException as error:  # noqa: BLE001 - handed to this function's caller
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(future, None, error)]
        try:
            db.execute("COMMIT")
        except sqlite3.Error as error:
            logger.error("a commit of 1 write failed: %s", error)
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(future, None, error)]
        self.commits += 1
        return [(future, result, None)]


def _unavailable(cause: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"The gateway's store cannot take writes ({type(cause).__name__}); nothing was recorded "
                            "or reserved. Retry later.", retry_after=30)


def _call(fn: Callable[[sqlite3.Connection], Any], db: sqlite3.Connection, future: asyncio.Future[Any]) -> _Outcome:
    try:
        return (future, fn(db), None)
    except BaseException as error:  # noqa: BLE001 - handed to this function's caller
        return (future, None, error)


def _settle(outcomes: Sequence[_Outcome]) -> None:
    """On the event loop: answer each caller (one wake-up for the whole batch)."""
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
