"""Real servers for integration tests: one PKI, one Mosquitto and one Kafka per test session.

Everything listens on 127.0.0.1 only. Every test in this directory is marked `integration`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fednestd.agent.uplink import Uplink
from fednestd.backend.devstack import BRIDGE_IDENTITY, DevPki, KafkaServer, MosquittoServer, bootstrap_topics
from fednestd.backend.federation import Federation
from fednestd.shared import announce, crypto
from fednestd.shared.config import AggregationConfig, BackendConfig, load_config
from fednestd.shared.topics import MQTT_ANNOUNCE

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """CA, broker certificate, bridge certificate (CN fednestd-bridge); `pki.device(id)` issues more."""
    return DevPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mosquitto(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    with MosquittoServer(
        pki.ca, pki.server_cert, pki.server_key, tmp_path_factory.mktemp("mosquitto")
    ) as server:
        yield server


@pytest.fixture
def private_mosquitto(pki: DevPki, tmp_path: Path) -> Iterator[MosquittoServer]:
    """A broker for one test, for state the session broker may hold from other tests.

    E.g. a bridge with a persistent session stays a member of the `$share/fednestd-bridges` group
    after it disconnects, and the broker keeps routing a share of the updates to it.
    """
    with MosquittoServer(pki.ca, pki.server_cert, pki.server_key, tmp_path / "private-mosquitto") as server:
        yield server


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """A started single-node Kafka with every topic of KAFKA_TOPICS created."""
    with KafkaServer(tmp_path_factory.mktemp("kafka")) as server:
        asyncio.run(bootstrap_topics(server.bootstrap))
        yield server


@pytest.fixture
def make_uplink(pki: DevPki, mosquitto: MosquittoServer) -> Iterator[Callable[..., Uplink]]:
    """Factory: `make_uplink("dev-a")` is a connected Uplink for that device (or the bridge's CN).

    `client_id` defaults to the identity, `broker` to the session broker. Uplinks are closed when
    the test ends.
    """
    opened: list[Uplink] = []

    def make(identity: str, client_id: str | None = None, broker: MosquittoServer | None = None) -> Uplink:
        cert, key = (pki.bridge_cert, pki.bridge_key) if identity == BRIDGE_IDENTITY else pki.device(identity)
        server = broker or mosquitto
        uplink = Uplink(server.host, server.port, pki.ca, cert, key, client_id or identity)
        uplink.connect()
        opened.append(uplink)
        return uplink

    yield make
    for uplink in opened:
        uplink.close()


@pytest.fixture
def make_federation(tmp_path: Path, pki: DevPki, mosquitto: MosquittoServer,
                    kafka: KafkaServer) -> Iterator[Callable[..., Federation]]:
    """Factory: a federation on the session brokers with these devices enrolled (placeholder data)."""
    made: list[Federation] = []

    def make(devices: tuple[str, ...], buffer_size: int = 2) -> Federation:
        aggregation = AggregationConfig(buffer_size=buffer_size)
        fed = Federation(tmp_path / "fed", pki, mosquitto, kafka, aggregation=aggregation)
        fed.write_backend_config()
        data = tmp_path / "placeholder.jsonl"
        data.write_text(json.dumps({"text": "unused"}) + "\n")
        for device_id in devices:
            fed.enroll(device_id, data)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.stop()


@pytest.fixture
def device_link(make_uplink: Callable[..., Uplink]) -> Callable[[Federation, str], Uplink]:
    """Factory: a device's Uplink, returned once this federation's bridge relays its announcement.

    Until a bridge subscribes, updates have no receiver; a retained announcement of an earlier
    federation on the shared broker does not count (it is signed by another backend key).
    """

    def link(fed: Federation, device_id: str) -> Uplink:
        backend = load_config(fed.tier1_path, BackendConfig)
        backend_key = crypto.load_public_key(crypto.public_key_path(backend.signing_key))
        uplink = make_uplink(device_id, client_id=f"{device_id}-test")
        ready = threading.Event()

        def on_announce(_topic: str, raw: bytes) -> None:
            try:
                announce.decode(raw, backend_key)
            except announce.AnnouncementError:
                return
            ready.set()

        uplink.subscribe(MQTT_ANNOUNCE, on_announce)
        fed.wait_for(ready.is_set, timeout=120, what="this backend's announcement (bridge up)")
        return uplink

    return link
