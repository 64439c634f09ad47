"""Names on the wire: the MQTT and Kafka topics are the contract between device and backend."""

from __future__ import annotations

import re

MQTT_ANNOUNCE = "fl/v1/models/announce"
MQTT_UPDATES_SUBSCRIPTION = "$share/fednestd-bridges/fl/v1/devices/+/updates"

KAFKA_ROUNDS = "control.federation_rounds"
KAFKA_UPDATES = "updates.experts.local"
KAFKA_TELEMETRY = "telemetry.edge"
KAFKA_TASKS = "tasks.training"
KAFKA_DEADLETTER = "updates.deadletter"
KAFKA_TOPICS = (KAFKA_ROUNDS, KAFKA_UPDATES, KAFKA_TELEMETRY, KAFKA_TASKS, KAFKA_DEADLETTER)

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_UPDATES_RE = re.compile(r"^fl/v1/devices/([^/]+)/updates$")


def updates_topic(device_id: str) -> str:
    return f"fl/v1/devices/{device_id}/updates"


def telemetry_topic(device_id: str) -> str:
    return f"fl/v1/devices/{device_id}/telemetry"


def control_topic(device_id: str) -> str:
    return f"fl/v1/devices/{device_id}/control"


def device_id_from_updates_topic(topic: str) -> str | None:
    """The device id an updates topic names, or None when the topic is not an updates topic."""
    match = _UPDATES_RE.match(topic)
    return match.group(1) if match else None
