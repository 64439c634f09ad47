"""Tamper-evident local audit log: every policy decision, export, model install and eviction.

Rows form a hash chain: each row's hash covers the previous row's hash, so editing or deleting a
row breaks the chain at that point and `verify()` names the row. The log stays on the device
(nothing in this module sends anything). Limits, by design of a plain chain: someone who can
rewrite the file can recompute every later hash, and dropping the newest rows leaves a shorter,
valid chain; anchoring the latest hash elsewhere would close both gaps.

Row hash: sha256 over the UTF-8 of `prev_hash|seq|ts|event|payload`, hex. Genesis prev_hash is 64
zeros. The separators are unambiguous because event names, timestamps, sequence numbers and hex
hashes cannot contain "|", and payload (canonical JSON) is last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fednestd.agent.storage import DurableStore

GENESIS_HASH = "0" * 64
TABLE = "audit"
AUDIT_EVENTS = frozenset({"policy_decision", "export", "model_install", "model_rejected", "eviction"})


class AuditError(Exception):
    """The audit log could not be written or read."""


@dataclass(frozen=True)
class AuditReport:
    """Outcome of `AuditLog.verify()`; `problems` name the seq and what is wrong."""

    ok: bool
    rows: int
    problems: list[str] = field(default_factory=list)


def canonical_json(payload: dict[str, Any]) -> str:
    """The one JSON text of a payload that the hash covers (sorted keys, no spaces, no NaN)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(prev_hash: str, seq: int, ts: str, event: str, payload: str) -> str:
    """Hash of one row; see the module docstring for the exact byte layout."""
    return hashlib.sha256(f"{prev_hash}|{seq}|{ts}|{event}|{payload}".encode()).hexdigest()


class AuditLog(DurableStore):
    """Append-only, hash-chained audit table in a local SQLite file (WAL)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        self._db[TABLE].create(
            {"seq": int, "ts": str, "event": str, "payload": str, "prev_hash": str, "hash": str},
            pk="seq",
            not_null={"ts", "event", "payload", "prev_hash", "hash"},
            if_not_exists=True,
        )

    def record(self, event: str, payload: dict[str, Any]) -> int:
        """Append one event in a single transaction and return its seq."""
        if event not in AUDIT_EVENTS:
            raise ValueError(f"unknown audit event {event!r}; expected one of {sorted(AUDIT_EVENTS)}")
        try:
            text = canonical_json(payload)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit payload for {event!r} is not JSON-serialisable: {exc}") from exc
        ts = datetime.now(UTC).isoformat(timespec="microseconds")
        with self._lock, self._immediate():
            last = self._db.execute(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
            self._db[TABLE].insert(
                {
                    "seq": seq,
                    "ts": ts,
                    "event": event,
                    "payload": text,
                    "prev_hash": prev_hash,
                    "hash": entry_hash(prev_hash, seq, ts, event, text),
                }
            )
        return seq

    def verify(self) -> AuditReport:
        """Walk the chain from genesis and report every edited row, gap and broken link."""
        problems: list[str] = []
        count = 0
        prev_seq = 0
        prev_hash = GENESIS_HASH
        cursor = self._db.execute(
            f"SELECT seq, ts, event, payload, prev_hash, hash FROM {TABLE} ORDER BY seq"
        )
        for seq, ts, event, payload, stored_prev, stored_hash in cursor:
            count += 1
            if seq != prev_seq + 1:
                missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}..{seq - 1}"
                problems.append(f"seq {seq}: rows {missing} are missing (deleted row)")
            if stored_prev != prev_hash:
                before = f"seq {prev_seq}" if prev_seq else "genesis"
                problems.append(f"seq {seq}: prev_hash does not match the hash of {before} (broken link)")
            if entry_hash(stored_prev, seq, ts, event, payload) != stored_hash:
                problems.append(f"seq {seq}: hash does not match the row's contents (edited row)")
            prev_seq, prev_hash = seq, stored_hash
        return AuditReport(ok=not problems, rows=count, problems=problems)

    def rows(self, event: str | None = None) -> list[dict[str, Any]]:
        """Rows in seq order, payload decoded; optionally only one event type."""
        where, args = ("event = ?", [event]) if event is not None else (None, None)
        out = []
        for row in self._db[TABLE].rows_where(where, args, order_by="seq"):
            try:
                row["payload"] = json.loads(row["payload"])
            except json.JSONDecodeError as exc:
                raise AuditError(f"audit row seq {row['seq']} has a payload that is not JSON: {exc}") from exc
            out.append(row)
        return out
