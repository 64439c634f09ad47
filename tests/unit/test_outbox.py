"""The outbox keeps allowed updates until the broker acknowledges them, across kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fednestd.agent.outbox import Outbox, OutboxConflictError, OutboxItemNotFoundError

TOPIC = "fl/v1/devices/dev-a/updates"


def test_enqueue_pending_delete(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        assert outbox.enqueue("u3", TOPIC, b"third") is True
        assert outbox.enqueue("u1", TOPIC, b"\x00first\xff") is True
        assert outbox.enqueue("u2", TOPIC, b"second") is True
        assert len(outbox) == 3
        items = outbox.pending()
        assert [i.update_id for i in items] == ["u3", "u1", "u2"]  # insertion order, not id order
        assert items[1].payload == b"\x00first\xff"
        assert items[1].topic == TOPIC
        assert items[1].attempts == 0 and items[1].last_error is None

        assert outbox.delete("u1") is True
        assert outbox.delete("u1") is False  # a duplicate PUBACK is harmless
        assert [i.update_id for i in outbox.pending()] == ["u3", "u2"]
        assert len(outbox) == 2


def test_enqueue_is_idempotent_on_update_id(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        assert outbox.enqueue("u1", TOPIC, b"delta") is True
        assert outbox.enqueue("u1", TOPIC, b"delta") is False
        assert len(outbox) == 1
        with pytest.raises(OutboxConflictError, match="'u1'"):
            outbox.enqueue("u1", TOPIC, b"another delta")
        with pytest.raises(OutboxConflictError):
            outbox.enqueue("u1", "fl/v1/devices/dev-b/updates", b"delta")
        assert [(i.update_id, i.payload) for i in outbox.pending()] == [("u1", b"delta")]


def test_mark_attempt_counts_and_keeps_the_last_error(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.enqueue("u1", TOPIC, b"delta")
        outbox.mark_attempt("u1", "connection refused")
        outbox.mark_attempt("u1", "timeout waiting for PUBACK")
        (item,) = outbox.pending()
        assert item.attempts == 2
        assert item.last_error == "timeout waiting for PUBACK"
        outbox.mark_attempt("u1", None)
        (item,) = outbox.pending()
        assert (item.attempts, item.last_error) == (3, None)
        with pytest.raises(OutboxItemNotFoundError, match="'missing'"):
            outbox.mark_attempt("missing", "x")


def test_items_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        outbox.enqueue("u1", TOPIC, b"delta")
        outbox.mark_attempt("u1", "offline")
    with Outbox(path) as reopened:
        (item,) = reopened.pending()
    assert (item.update_id, item.payload, item.attempts, item.last_error) == ("u1", b"delta", 1, "offline")


def test_enqueue_that_returned_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    payload = os.urandom(64 * 1024)
    (tmp_path / "payload.bin").write_bytes(payload)
    writer = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fednestd.agent.outbox import Outbox
        outbox = Outbox({str(path)!r})
        outbox.enqueue("u-kill", {TOPIC!r}, Path({str(tmp_path / "payload.bin")!r}).read_bytes())
        print("enqueued", flush=True)
        time.sleep(120)  # never closes the connection: only SIGKILL ends it
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "enqueued"
        # The row is still in the WAL, not checkpointed into the main file, when the process dies.
        assert (tmp_path / "outbox.db-wal").stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Outbox(path) as recovered:
        items = recovered.pending()
    assert [(i.update_id, i.topic) for i in items] == [("u-kill", TOPIC)]
    assert items[0].payload == payload
