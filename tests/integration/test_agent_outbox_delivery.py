"""The outbox forgets an update only after the broker's PUBACK: refusals and outages keep it queued."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fednestd.agent.daemon import Agent
from fednestd.agent.outbox import Outbox
from fednestd.agent.uplink import Uplink
from fednestd.backend.devstack import MosquittoServer


class _OutboxOnly(Agent):
    """Just the delivery half of the agent: no model, policy or data needed to flush an outbox."""

    def __init__(self, outbox: Outbox, uplink: Uplink, audit_path: Path) -> None:  # noqa: D107
        from fednestd.agent.audit import AuditLog

        self.outbox, self.uplink, self.audit = outbox, uplink, AuditLog(audit_path)


def test_refused_publish_stays_queued_with_the_reason(tmp_path: Path, make_uplink: Callable[..., Uplink]) -> None:
    uplink = make_uplink("deliver-a")
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue("u-own", "fl/v1/devices/deliver-a/updates", b"payload-1")
    outbox.enqueue("u-foreign", "fl/v1/devices/deliver-b/updates", b"payload-2")  # the ACL refuses this
    agent = _OutboxOnly(outbox, uplink, tmp_path / "audit.db")
    assert agent.flush_outbox() == 1
    [left] = outbox.pending()
    assert left.update_id == "u-foreign" and left.attempts == 1
    assert "Not authorized" in (left.last_error or "")
    assert [r["event"] for r in agent.audit.rows()] == ["export"]


def test_broker_outage_keeps_updates_until_it_returns(tmp_path: Path, private_mosquitto: MosquittoServer,
                                                      make_uplink: Callable[..., Uplink]) -> None:
    uplink = make_uplink("deliver-c", broker=private_mosquitto)
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue("u-1", "fl/v1/devices/deliver-c/updates", b"x" * 1000)
    agent = _OutboxOnly(outbox, uplink, tmp_path / "audit.db")
    private_mosquitto.fixed_port = private_mosquitto.port  # come back on the same port
    private_mosquitto.stop()
    deadline = time.monotonic() + 30
    while uplink.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not uplink.connected
    assert agent.flush_outbox() == 0
    assert [i.update_id for i in outbox.pending()] == ["u-1"]
    private_mosquitto.start()
    deadline = time.monotonic() + 60  # paho's own reconnect with backoff
    while not uplink.connected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert uplink.connected
    assert agent.flush_outbox() == 1
    assert len(outbox) == 0
