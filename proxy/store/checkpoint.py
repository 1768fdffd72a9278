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
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Checkpointer:
    """Checkpoints the WAL every ``interval`` seconds until stopped; counts what it did."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], interval: float = 1.0) -> None:
        self._connect = connect
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-checkpoint", daemon=True)
        self.checkpoints = 0
        self.pages_copied = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        db = self._connect()
        try:
            while not self._stop.wait(self.interval):
                self.checkpoint(db)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        try:
            _, _, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as error:  # the next round tries again; the WAL only grows meanwhile
            logger.warning("WAL checkpoint failed: %s", error)
            return
        self.checkpoints += 1
        self.pages_copied += max(0, copied)
