"""MQTT <-> Kafka bridge.

Uplink: devices' updates arrive on a shared subscription (several bridges may run), are checked
(envelope structure, topic/envelope/certificate identity, device signature), produced to Kafka, and
only then acknowledged to the broker, so a bridge crash makes the broker redeliver instead of losing
the update. Rejected messages go to the dead-letter topic with their reason, then are acknowledged.
Downlink: model announcements from Kafka are republished to MQTT, retained.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fednestd.backend.devices import DeviceRegistry
from fednestd.shared import envelope
from fednestd.shared.config import BackendConfig
from fednestd.shared.envelope import DeltaEnvelope, EnvelopeError
from fednestd.shared.topics import (
    KAFKA_DEADLETTER,
    KAFKA_ROUNDS,
    KAFKA_UPDATES,
    MQTT_ANNOUNCE,
    MQTT_UPDATES_SUBSCRIPTION,
    device_id_from_updates_topic,
)

log = logging.getLogger("fednestd.bridge")


def check_update(topic: str, payload: bytes, devices: DeviceRegistry) -> DeltaEnvelope:
    """Everything the bridge requires before an update may enter Kafka."""
    topic_device = device_id_from_updates_topic(topic)
    if topic_device is None:
        raise EnvelopeError("bad_topic", f"{topic!r} is not a device updates topic")
    env = envelope.decode(payload)
    ident = devices.check_sender(topic_device, env.device_id)
    envelope.verify_signature(env, ident.signing_key)
    return env


def deadletter_headers(stage: str, err: EnvelopeError, source: str) -> list[tuple[str, bytes]]:
    return [
        ("stage", stage.encode()),
        ("reason", err.code.encode()),
        ("detail", err.detail.encode()),
        ("source", source.encode()),
    ]


@dataclass
class BridgeStats:
    forwarded: int = 0
    rejected: int = 0
    announced: int = 0


def _report_failure(topic: str, future: concurrent.futures.Future[None]) -> None:
    """Kafka unavailable: the message stays unacknowledged, so the broker redelivers it to a bridge later."""
    if not future.cancelled() and future.exception() is not None:
        log.error("could not forward a message from %s (not acknowledged): %r", topic, future.exception())


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("announcement relay stopped: %r", task.exception())


class Bridge:
    def __init__(self, cfg: BackendConfig, client_id: str = "fednestd-bridge") -> None:
        self.cfg = cfg
        self.devices = DeviceRegistry(cfg.device_registry, cfg.ca_cert)
        self.stats = BridgeStats()
        self._client_id = client_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._mqtt: mqtt.Client | None = None
        self._connected = asyncio.Event()

    def _make_mqtt(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.cfg.mqtt.ca))
        context.load_cert_chain(str(self.cfg.mqtt.cert), str(self.cfg.mqtt.key))
        client.tls_set_context(context)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, _ud: object, _flags: object, rc: object, _props: object) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker refused the bridge: %s", rc)
            return
        client.subscribe(MQTT_UPDATES_SUBSCRIPTION, qos=1)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_message(self, client: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self._forward(client, msg.topic, msg.payload, msg.mid, msg.qos), self._loop
        )
        future.add_done_callback(functools.partial(_report_failure, msg.topic))

    async def _forward(self, client: mqtt.Client, topic: str, payload: bytes, mid: int, qos: int) -> None:
        try:
            env = check_update(topic, payload, self.devices)
        except EnvelopeError as err:
            log.warning("rejected update on %s: %s", topic, err)
            await self._produce(KAFKA_DEADLETTER, payload, topic.encode(), deadletter_headers("bridge", err, topic))
            self.stats.rejected += 1
        else:
            headers = [("update_id", env.update_id.encode()), ("device_id", env.device_id.encode())]
            await self._produce(KAFKA_UPDATES, payload, env.device_id.encode(), headers)
            self.stats.forwarded += 1
            log.info("forwarded update %s from %s (base v%d)", env.update_id, env.device_id, env.base_version)
        client.ack(mid, qos)  # only now may the broker forget the message

    async def _produce(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Retry until Kafka has the record: the MQTT message stays unacknowledged (and owned) meanwhile."""
        assert self._producer is not None
        delay = 1.0
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=key, headers=headers)
                return
            except KafkaError as exc:
                log.error("Kafka refused a record for %s (%r); retrying in %.0fs", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    async def _announce_loop(self) -> None:
        consumer = AIOKafkaConsumer(
            KAFKA_ROUNDS,
            bootstrap_servers=self.cfg.kafka.bootstrap,
            group_id=f"{self.cfg.kafka.group_id}-bridge-downlink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            async for record in consumer:
                assert self._mqtt is not None
                info = self._mqtt.publish(MQTT_ANNOUNCE, record.value, qos=1, retain=True)
                await asyncio.to_thread(info.wait_for_publish, 30)
                await consumer.commit()
                self.stats.announced += 1
                log.info("announced %s", record.value[:120])
        finally:
            await consumer.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.cfg.kafka.bootstrap, acks="all", enable_idempotence=True
        )
        await self._producer.start()
        self._mqtt = self._make_mqtt()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker keeps our QoS-1 backlog while we restart
        self._mqtt.connect(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=30, clean_start=False, properties=props)
        self._mqtt.loop_start()
        announcer = asyncio.create_task(self._announce_loop())
        announcer.add_done_callback(_log_crash)
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=30)
            log.info("bridge up: MQTT %s:%d <-> Kafka %s",
                     self.cfg.mqtt.host, self.cfg.mqtt.port, self.cfg.kafka.bootstrap)
            await (stop.wait() if stop else asyncio.Event().wait())
        finally:
            announcer.cancel()
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
            await self._producer.stop()
