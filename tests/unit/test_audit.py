"""The hash-chained audit log detects edited and deleted rows, checked with raw sqlite3 tampering."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fednestd.agent.audit import GENESIS_HASH, AuditLog, canonical_json, entry_hash


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        assert log.record("policy_decision", {"allow": True, "reasons": [], "update_id": "u1"}) == 1
        assert log.record("export", {"update_id": "u1", "bytes": 123456}) == 2
        assert log.record("model_install", {"version": "3", "sha256": "ab" * 32}) == 3
        assert log.record("policy_decision", {"allow": False, "reasons": ["kind"], "update_id": "u2"}) == 4
        assert log.record("eviction", {"update_id": "u0", "why": "disk full"}) == 5
    return path


def tamper(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


def test_chain_verifies(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        report = log.verify()
        rows = log.rows()
    assert report.ok is True
    assert report.rows == 5
    assert report.problems == []
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    for before, row in zip(rows, rows[1:], strict=False):
        assert row["prev_hash"] == before["hash"]


def test_hash_is_the_documented_formula(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        row = log.rows()[1]
    payload = canonical_json(row["payload"])
    assert payload == '{"bytes":123456,"update_id":"u1"}'
    assert row["hash"] == entry_hash(row["prev_hash"], row["seq"], row["ts"], row["event"], payload)


def test_edited_payload_is_detected_with_its_seq(log_path: Path) -> None:
    tamper(log_path, "UPDATE audit SET payload = ? WHERE seq = 2", '{"bytes":1,"update_id":"u1"}')
    with AuditLog(log_path) as log:
        report = log.verify()
    assert report.ok is False
    assert report.rows == 5
    assert report.problems == ["seq 2: hash does not match the row's contents (edited row)"]


def test_edited_event_is_detected(log_path: Path) -> None:
    tamper(log_path, "UPDATE audit SET event = 'eviction' WHERE seq = 4")
    with AuditLog(log_path) as log:
        assert log.verify().problems == ["seq 4: hash does not match the row's contents (edited row)"]


def test_deleted_middle_row_is_detected(log_path: Path) -> None:
    tamper(log_path, "DELETE FROM audit WHERE seq = 3")
    with AuditLog(log_path) as log:
        report = log.verify()
    assert report.ok is False
    assert report.rows == 4
    assert report.problems == [
        "seq 4: rows 3 are missing (deleted row)",
        "seq 4: prev_hash does not match the hash of seq 2 (broken link)",
    ]


def test_deleted_first_rows_are_detected(log_path: Path) -> None:
    tamper(log_path, "DELETE FROM audit WHERE seq IN (1, 2)")
    with AuditLog(log_path) as log:
        problems = log.verify().problems
    assert problems == [
        "seq 3: rows 1..2 are missing (deleted row)",
        "seq 3: prev_hash does not match the hash of genesis (broken link)",
    ]


def test_rewritten_row_with_recomputed_hash_breaks_the_next_link(log_path: Path) -> None:
    """Fixing up the edited row's own hash is not enough: the next row still points at the old one."""
    conn = sqlite3.connect(log_path)
    seq, ts, event, prev = conn.execute(
        "SELECT seq, ts, event, prev_hash FROM audit WHERE seq = 2"
    ).fetchone()
    forged = '{"bytes":1,"update_id":"u1"}'
    with conn:
        conn.execute(
            "UPDATE audit SET payload = ?, hash = ? WHERE seq = 2",
            (forged, entry_hash(prev, seq, ts, event, forged)),
        )
    conn.close()
    with AuditLog(log_path) as log:
        assert log.verify().problems == ["seq 3: prev_hash does not match the hash of seq 2 (broken link)"]


def test_rows_filter_by_event(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        decisions = log.rows("policy_decision")
        assert log.rows("model_rejected") == []
    assert [r["seq"] for r in decisions] == [1, 4]
    assert decisions[1]["payload"] == {"allow": False, "reasons": ["kind"], "update_id": "u2"}


def test_reopened_log_continues_the_chain(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        assert log.record("model_rejected", {"version": "4", "why": "bad signature"}) == 6
        report = log.verify()
    assert report.ok is True
    assert report.rows == 6


def test_unknown_event_and_bad_payload_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.db") as log:
        with pytest.raises(ValueError, match="unknown audit event 'exprot'"):
            log.record("exprot", {})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            log.record("export", {"bytes": b"\x00"})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            log.record("export", {"loss": float("nan")})
        assert log.rows() == []


def test_log_uses_wal(log_path: Path) -> None:
    conn = sqlite3.connect(log_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
