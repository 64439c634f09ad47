"""The device's local SQLite files (outbox, audit log) open the same durable way."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import sqlite_utils


def open_durable(path: Path) -> sqlite_utils.Database:
    """WAL plus synchronous=FULL: a committed row survives power loss, not only a crash of this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    db.execute("PRAGMA synchronous=FULL")
    return db


class DurableStore:
    """One SQLite file, opened durably, shared by this process's threads under one lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = open_durable(self.path)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _immediate(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: take the write lock before reading, so two processes writing at once
        serialise (the audit chain head, the outbox duplicate check) instead of racing."""
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
