"""WAL checkpoints on a thread of their own, off the writer's path.

By default SQLite checkpoints inside whichever ``COMMIT`` pushes the WAL past
1,000 pages: that commit copies the WAL's pages back into the database file and
fsyncs it, and every write queued behind it waits. With a large database the
pages are scattered and that copy takes long (submits at 1M rows showed p99
spikes of 200 ms). So the writer's connection has ``wal_autocheckpoint = 0``
and this thread runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection
every ``interval`` seconds: a passive checkpoint takes no write lock, so
commits go on while it copies, and the WAL restarts from its beginning once a
checkpoint has caught up.

A long read (a spend report over a big ledger) keeps checkpoints from catching
up and the WAL grows meanwhile. Two things give the space back: every
connection has ``journal_size_limit`` (:data:`WAL_SIZE_LIMIT`), so the next
write after a full checkpoint truncates the WAL to it; and when the store is
idle (a full checkpoint, and no new frames since the last round) this thread
runs ``wal_checkpoint(TRUNCATE)``, which empties the file. It does so without
waiting (``busy_timeout = 0``): if anyone is writing, it is not idle after all.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Bytes a WAL is truncated to once checkpointed (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class Checkpointer:
    """Checkpoints the WAL every ``interval`` seconds until stopped; counts what it did."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], interval: float = 1.0) -> None:
        self._connect = connect
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-checkpoint", daemon=True)
        self.checkpoints = 0
        self.pages_copied = 0
        self.truncations = 0
        self._frames_seen = -1  # the WAL's frames at the last round: unchanged and all copied means idle

    def start(self) -> None:
        self._thread.start()

    def stop_soon(self) -> None:
        """Ask the thread to end after the checkpoint it may be running (never waits)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        db = self._connect()
        db.execute("PRAGMA busy_timeout = 0")  # never wait: a busy store is simply not idle
        try:
            while not self._stop.wait(self.interval):
                self.checkpoint(db)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as error:  # the next round tries again; the WAL only grows meanwhile
            logger.warning("WAL checkpoint failed: %s", error)
            return
        self.checkpoints += 1
        self.pages_copied += max(0, copied)
        idle = frames > 0 and copied == frames and frames == self._frames_seen
        self._frames_seen = frames
        if idle:
            try:
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error:  # somebody wrote after all: try again when idle
                return
            if not busy:
                self.truncations += 1
                self._frames_seen = 0
