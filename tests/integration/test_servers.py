"""The real Mosquitto and Kafka behave as the device/backend contract assumes (ACL, mTLS, topics)."""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.structs import TopicPartition

from fednestd.agent.uplink import Uplink, UplinkTLSError
from fednestd.backend.devstack import (
    BRIDGE_IDENTITY,
    DevPki,
    KafkaServer,
    MosquittoServer,
    bootstrap_topics,
)
from fednestd.shared import pki as x509
from fednestd.shared.topics import (
    KAFKA_TOPICS,
    KAFKA_UPDATES,
    MQTT_ANNOUNCE,
    MQTT_UPDATES_SUBSCRIPTION,
    control_topic,
    updates_topic,
)

MakeUplink = Callable[..., Uplink]
# MQTT v5 success codes a PUBACK may carry: 0 Success, 16 No matching subscribers.
PUBACK_DELIVERED = (0, 16)


def _collector() -> tuple[queue.Queue[tuple[str, bytes]], Callable[[str, bytes], None]]:
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    return received, lambda topic, payload: received.put((topic, payload))


def test_device_publish_to_own_updates_topic_is_acknowledged(make_uplink: MakeUplink) -> None:
    device = make_uplink("dev-own")
    result = device.publish(updates_topic("dev-own"), b"delta", timeout=10)
    assert result.ok, result
    assert result.reason_code in PUBACK_DELIVERED


def test_publish_to_another_devices_topic_is_not_authorized(make_uplink: MakeUplink) -> None:
    device = make_uplink("dev-a")
    result = device.publish(updates_topic("dev-b"), b"forged", timeout=10)
    assert not result.ok
    assert result.reason == "Not authorized"
    assert result.reason_code == 0x87


def test_device_cannot_publish_a_model_announcement(make_uplink: MakeUplink) -> None:
    device = make_uplink("dev-c")
    assert not device.publish(MQTT_ANNOUNCE, b"fake model", timeout=10).ok


def test_client_without_certificate_cannot_connect(pki: DevPki, mosquitto: MosquittoServer) -> None:
    uplink = Uplink(mosquitto.host, mosquitto.port, pki.ca, None, None, "anonymous")
    with pytest.raises(UplinkTLSError):
        uplink.connect(timeout=10)
    assert not uplink.connected


def test_certificate_from_another_ca_cannot_connect(
    pki: DevPki, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    # Same CN as a real device: only the issuing CA differs.
    rogue_ca, rogue_key = x509.create_ca(tmp_path, name="rogue-ca")
    cert, key = x509.issue_client_cert(rogue_ca, rogue_key, "dev-a", tmp_path)
    uplink = Uplink(mosquitto.host, mosquitto.port, pki.ca, cert, key, "dev-a")
    with pytest.raises(UplinkTLSError):
        uplink.connect(timeout=10)


def test_bridge_receives_device_update_via_shared_subscription(
    make_uplink: MakeUplink, private_mosquitto: MosquittoServer
) -> None:
    # A private broker: other tests' bridges may remain members of the share group on the session one.
    received, handler = _collector()
    bridge = make_uplink(BRIDGE_IDENTITY, client_id="bridge-0", broker=private_mosquitto)
    bridge.subscribe(MQTT_UPDATES_SUBSCRIPTION, handler)
    device = make_uplink("dev-share", broker=private_mosquitto)
    payloads = [uuid.uuid4().bytes for _ in range(3)]
    for payload in payloads:
        assert device.publish(updates_topic("dev-share"), payload, timeout=10).ok
    assert [received.get(timeout=10) for _ in payloads] == [(updates_topic("dev-share"), p) for p in payloads]


def test_device_does_not_receive_another_devices_updates(make_uplink: MakeUplink) -> None:
    # Mosquitto 2.0 grants the SUBACK but filters delivery by the read ACL; the bridge is the control.
    bridge_inbox, bridge_handler = _collector()
    snoop_inbox, snoop_handler = _collector()
    make_uplink(BRIDGE_IDENTITY, client_id="bridge-1").subscribe(updates_topic("dev-victim"), bridge_handler)
    make_uplink("dev-snoop").subscribe(updates_topic("dev-victim"), snoop_handler)
    payload = uuid.uuid4().bytes
    assert make_uplink("dev-victim").publish(updates_topic("dev-victim"), payload, timeout=10).ok
    assert bridge_inbox.get(timeout=10)[1] == payload
    with pytest.raises(queue.Empty):
        snoop_inbox.get(timeout=0.5)


def test_device_reads_retained_announcement_and_its_control_topic(make_uplink: MakeUplink) -> None:
    bridge = make_uplink(BRIDGE_IDENTITY, client_id="bridge-2")
    announcement = b"model v" + uuid.uuid4().hex.encode()
    assert bridge.publish(MQTT_ANNOUNCE, announcement, timeout=10, retain=True).ok

    received, handler = _collector()
    device = make_uplink("dev-late")  # connects after the announcement: gets the retained copy
    device.subscribe(MQTT_ANNOUNCE, handler)
    device.subscribe(control_topic("dev-late"), handler)
    assert received.get(timeout=10) == (MQTT_ANNOUNCE, announcement)
    assert bridge.publish(control_topic("dev-late"), b"pause", timeout=10).ok
    assert received.get(timeout=10) == (control_topic("dev-late"), b"pause")


def test_uplink_reconnects_and_resubscribes_after_broker_restart(pki: DevPki, tmp_path: Path) -> None:
    # A private broker: restarting the session one would disturb other tests.
    with MosquittoServer(pki.ca, pki.server_cert, pki.server_key, tmp_path / "mq") as first:
        port = first.port
    received, handler = _collector()
    broker = MosquittoServer(pki.ca, pki.server_cert, pki.server_key, tmp_path / "mq", port=port)
    with broker:
        cert, key = pki.device("dev-restart")
        bridge = Uplink(broker.host, port, pki.ca, pki.bridge_cert, pki.bridge_key, "bridge-restart")
        device = Uplink(broker.host, port, pki.ca, cert, key, "dev-restart")
        with bridge, device:
            bridge.connect()
            device.connect()
            bridge.subscribe(updates_topic("dev-restart"), handler)

            broker.stop()
            _wait_until(lambda: not bridge.connected and not device.connected, 10)
            broker.start()
            _wait_until(lambda: bridge.connected and device.connected, 30)

            payload = uuid.uuid4().bytes
            assert device.publish(updates_topic("dev-restart"), payload, timeout=10).ok
            assert received.get(timeout=10) == (updates_topic("dev-restart"), payload)


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_kafka_round_trip_on_updates_topic(kafka: KafkaServer) -> None:
    key, value = uuid.uuid4().hex.encode(), uuid.uuid4().bytes

    async def round_trip() -> tuple[bytes, int]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait(KAFKA_UPDATES, value, key=key)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            KAFKA_UPDATES,
            bootstrap_servers=kafka.bootstrap,
            group_id=f"test-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                async for record in consumer:
                    if record.key == key:
                        await consumer.commit()
                        committed = await consumer.committed(TopicPartition(record.topic, record.partition))
                        assert record.value is not None
                        return record.value, committed - record.offset
        finally:
            await consumer.stop()
        raise AssertionError("consumer stopped without a record")

    got, committed_past_record = asyncio.run(round_trip())
    assert got == value
    assert committed_past_record == 1  # the group coordinator stored the offset after the record


async def _list_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_bootstrap_topics_is_idempotent(kafka: KafkaServer) -> None:
    assert asyncio.run(bootstrap_topics(kafka.bootstrap)) == []  # the fixture created them already
    assert asyncio.run(bootstrap_topics(kafka.bootstrap)) == []
    assert set(KAFKA_TOPICS) <= asyncio.run(_list_topics(kafka.bootstrap))


def test_bootstrap_topics_cli(kafka: KafkaServer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fednestd.backend.cli import app

    cfg = tmp_path / "tier1.yaml"
    cfg.write_text(json.dumps({"kafka": {"bootstrap": kafka.bootstrap}, "mqtt": {"cert": "c", "key": "k"}}))
    result = CliRunner().invoke(app, ["messaging", "bootstrap-topics", "-c", str(cfg)])
    assert result.exit_code == 0 and "none (all existed)" in result.output, result.output


def test_kafka_does_not_auto_create_topics(kafka: KafkaServer) -> None:
    # A typo in a topic name must fail loudly instead of creating a topic nobody consumes.
    async def send_to_unknown_topic() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, request_timeout_ms=1500)
        await producer.start()
        try:
            await producer.send_and_wait(typo, b"lost")
        finally:
            await producer.stop()

    typo = KAFKA_UPDATES + "l"
    with pytest.raises(UnknownTopicOrPartitionError):
        asyncio.run(send_to_unknown_topic())
    assert typo not in asyncio.run(_list_topics(kafka.bootstrap))
