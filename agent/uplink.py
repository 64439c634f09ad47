"""The device's MQTT link to the backend: mutual TLS, MQTT v5, QoS 1, reconnect with backoff.

MQTT v5 matters here: a broker that refuses a publish (ACL) answers with a PUBACK reason code, so
`publish` can tell "delivered" from "not authorized" instead of guessing. This module is imported on
devices, so it must stay free of torch, mlflow and other backend-only packages.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]

KEEPALIVE_S = 30
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 60


class UplinkError(Exception):
    """Base class for failures of the MQTT link."""


class UplinkUnreachable(UplinkError):
    """No TCP connection to the broker (wrong host/port, broker down, network off)."""


class UplinkTLSError(UplinkError):
    """TLS failed: our certificate was rejected (missing, other CA, expired) or the broker's was."""


class UplinkRefused(UplinkError):
    """The broker answered, but with a failure reason code (CONNACK or SUBACK)."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class UplinkTimeout(UplinkError):
    """No answer from the broker in time; a QoS-1 publish may still be delivered later."""


@dataclass(frozen=True)
class PublishResult:
    """The broker's verdict on one QoS-1 publish, from its PUBACK reason code."""

    ok: bool
    reason_code: int
    reason: str


class Uplink:
    """One MQTT v5 session over mutual TLS.

    `host` must be a name or address in the broker certificate (it is checked). Handlers run on
    paho's network thread: keep them short.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ca: Path,
        cert: Path | None,
        key: Path | None,
        client_id: str,
    ) -> None:
        """`cert`/`key` are the device's identity; None only to probe that the broker refuses that."""
        self.host, self.port, self.client_id = host, port, client_id
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
        self._client.tls_set_context(context)
        self._client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_log = self._on_log

        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._lost_before_connack = False
        self._connected = False
        self._acks: dict[int, PublishResult] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._abandoned: set[int] = set()
        self._handlers: dict[str, tuple[MessageHandler, int]] = {}
        self._errors: deque[str] = deque(maxlen=5)

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10) -> None:
        """Connect and wait for CONNACK; afterwards paho reconnects by itself with backoff."""
        with self._cond:
            self._connack, self._lost_before_connack = None, False
            self._errors.clear()
        where = f"{self.host}:{self.port}"
        try:
            self._client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        except ssl.SSLError as exc:
            raise UplinkTLSError(f"TLS handshake with {where} as {self.client_id!r} failed: {exc}") from exc
        except OSError as exc:
            raise UplinkUnreachable(f"cannot reach MQTT broker at {where}: {exc}") from exc
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None or self._lost_before_connack, timeout)
            connack, lost = self._connack, self._lost_before_connack
        if connack is not None and not connack.is_failure:
            return
        self._shutdown()
        if connack is not None:
            raise UplinkRefused(f"broker {where} refused {self.client_id!r}: {connack}", connack.value)
        if lost:
            # With TLS 1.3 the broker checks our certificate after the handshake completed on our side,
            # so a rejected certificate shows up as the connection dropping before CONNACK.
            detail = "; ".join(self._errors) or "connection closed before CONNACK"
            raise UplinkTLSError(
                f"broker {where} dropped {self.client_id!r} before CONNACK (certificate rejected?): {detail}"
            )
        raise UplinkTimeout(f"no CONNACK from {where} within {timeout}s")

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1, timeout: float = 10) -> None:
        """Route messages matching `topic` (shared subscriptions included) to `handler`.

        The subscription is renewed after every reconnect. Raises UplinkRefused when the broker's
        SUBACK refuses it (e.g. the ACL does not allow this identity to read the topic).
        """
        with self._cond:
            self._handlers[topic] = (handler, qos)
        if not self._connected:
            return  # _on_connect subscribes once the link is up
        rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # lost the link meanwhile; _on_connect will subscribe
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                self._abandoned.add(mid)
                raise UplinkTimeout(f"no SUBACK for {topic!r} within {timeout}s")
            codes = self._subacks.pop(mid)
        failures = [code for code in codes if code.is_failure]
        if failures:
            with self._cond:
                self._handlers.pop(topic, None)
            raise UplinkRefused(f"broker refused subscription {topic!r}: {failures[0]}", failures[0].value)

    def publish(
        self, topic: str, payload: bytes, timeout: float = 30, *, retain: bool = False
    ) -> PublishResult:
        """Publish at QoS 1 and wait for the PUBACK; ok is False when the broker refused it.

        Raises UplinkTimeout when no PUBACK came in time. paho keeps the message queued and resends
        it after a reconnect, so the caller must treat a timeout as "maybe delivered" (receivers
        deduplicate).
        """
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise UplinkError(f"publish to {topic!r} not queued: {mqtt.error_string(info.rc)}")
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout):
                self._abandoned.add(info.mid)
                raise UplinkTimeout(f"no PUBACK for {topic!r} (mid {info.mid}) within {timeout}s")
            return self._acks.pop(info.mid)

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._shutdown()

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shutdown(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False

    # paho callbacks: they run on paho's network thread.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason_code
            self._connected = not reason_code.is_failure
            handlers = dict(self._handlers) if self._connected else {}
            self._cond.notify_all()
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%s refused %s: %s", self.host, self.port, self.client_id, reason_code)
        for topic, (_, qos) in handlers.items():
            _, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                with self._cond:
                    self._abandoned.add(mid)  # nobody waits for this SUBACK; _on_subscribe logs refusals

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._cond:
            if self._connack is None:
                self._lost_before_connack = True
            self._connected = False
            self._cond.notify_all()
        log.info("MQTT link %s to %s:%s down: %s", self.client_id, self.host, self.port, reason_code)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, props: Properties | None
    ) -> None:
        result = PublishResult(
            ok=not reason_code.is_failure, reason_code=reason_code.value, reason=str(reason_code)
        )
        with self._cond:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._acks[mid] = result
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._cond:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
            else:
                self._subacks[mid] = codes
            self._cond.notify_all()
        for code in codes:
            if code.is_failure:
                log.warning("MQTT broker refused a subscription of %s: %s", self.client_id, code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            handlers = [h for sub, (h, _) in self._handlers.items() if _matches(sub, message.topic)]
        for handler in handlers:
            try:
                handler(message.topic, bytes(message.payload))
            except Exception:  # a handler bug must not kill the network thread
                log.exception("MQTT handler for %s failed", message.topic)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self._errors.append(text)


def _matches(subscription: str, topic: str) -> bool:
    """paho's matcher, after stripping a shared subscription's `$share/<group>/` prefix."""
    if subscription.startswith("$share/"):
        parts = subscription.split("/", 2)
        if len(parts) < 3:
            return False
        subscription = parts[2]
    return mqtt.topic_matches_sub(subscription, topic)
