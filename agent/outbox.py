"""Durable store-and-forward queue between the policy decision and the MQTT uplink.

An update enters only after the policy allowed it and leaves only after the broker acknowledged
it (PUBACK), so a device that loses power or is killed mid-send publishes it again on restart.
Durability: WAL with synchronous=FULL, so an `enqueue` that returned has been fsynced and survives
`kill -9` and power loss. Delivery is at-least-once; the backend deduplicates on update_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fednestd.agent.storage import DurableStore

TABLE = "outbox"


class OutboxError(Exception):
    """Base class for outbox misuse."""


class OutboxConflictError(OutboxError):
    """An update_id was enqueued again with a different topic or payload."""


class OutboxItemNotFoundError(OutboxError, KeyError):
    """No queued item has that update_id."""


@dataclass(frozen=True)
class OutboxItem:
    """One queued update as stored."""

    update_id: str
    topic: str
    payload: bytes
    created_at: str
    attempts: int
    last_error: str | None


class Outbox(DurableStore):
    """SQLite-backed queue; one instance per process, safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        self._db[TABLE].create(
            {
                "update_id": str,
                "topic": str,
                "payload": bytes,
                "created_at": str,
                "attempts": int,
                "last_error": str,
            },
            pk="update_id",
            not_null={"topic", "payload", "created_at", "attempts"},
            defaults={"attempts": 0},
            if_not_exists=True,
        )

    def enqueue(self, update_id: str, topic: str, payload: bytes) -> bool:
        """Store an update durably; True if new, False if this exact update was already queued.

        Idempotent so that a retry after a crash between "policy allowed" and "enqueue returned"
        is harmless; the same id with different content is a bug and raises.
        """
        if not update_id:
            raise ValueError("update_id must be a non-empty string")
        with self._lock, self._immediate():
            existing = self._db.execute(
                f"SELECT topic, payload FROM {TABLE} WHERE update_id = ?", [update_id]
            ).fetchone()
            if existing is not None:
                if existing[0] != topic or bytes(existing[1]) != payload:
                    raise OutboxConflictError(
                        f"update {update_id!r} is already queued with a different topic or payload"
                    )
                return False
            self._db[TABLE].insert(
                {
                    "update_id": update_id,
                    "topic": topic,
                    "payload": bytes(payload),
                    "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "attempts": 0,
                    "last_error": None,
                }
            )
        return True

    def pending(self) -> list[OutboxItem]:
        """Queued updates, oldest first (insertion order: device clocks may jump at NTP sync)."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT update_id, topic, payload, created_at, attempts, last_error "
                f"FROM {TABLE} ORDER BY rowid"
            )
            return [
                OutboxItem(uid, topic, bytes(payload), created, attempts, error)
                for uid, topic, payload, created, attempts, error in cursor
            ]

    def mark_attempt(self, update_id: str, error: str | None) -> None:
        """Count one publish attempt and remember why it failed (None when it did not fail)."""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE {TABLE} SET attempts = attempts + 1, last_error = ? WHERE update_id = ?",
                [error, update_id],
            )
            if cursor.rowcount == 0:
                raise OutboxItemNotFoundError(f"no queued update {update_id!r}")

    def delete(self, update_id: str) -> bool:
        """Remove an update after the broker's PUBACK; False if it was already gone (duplicate ack)."""
        with self._lock:
            cursor = self._db.execute(f"DELETE FROM {TABLE} WHERE update_id = ?", [update_id])
            return cursor.rowcount > 0

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])
