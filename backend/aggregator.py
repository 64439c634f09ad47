"""Buffered asynchronous aggregation of edge adapter updates into the experts (FedBuff-style).

The Kafka loop only feeds the pure functions in `aggregation/`. Offsets are committed after the new
version is registered in MLflow (its lineage holds the merged update ids), so a crash before that
replays the buffer and a crash after it is deduplicated: no update is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from fednestd.backend.aggregation import merge, strategies
from fednestd.backend.bridge import deadletter_headers
from fednestd.backend.compiler import compile_bundle
from fednestd.backend.devices import DeviceRegistry
from fednestd.backend.registry import ModelRegistry
from fednestd.shared import bundle, crypto, envelope
from fednestd.shared.announce import Announcement
from fednestd.shared.config import AggregationConfig, BackendConfig, ModelConfig
from fednestd.shared.envelope import DeltaEnvelope, EnvelopeError
from fednestd.shared.model import adapter_shapes, build_model, partition_state
from fednestd.shared.topics import KAFKA_DEADLETTER, KAFKA_ROUNDS, KAFKA_UPDATES

log = logging.getLogger("fednestd.aggregator")


@dataclass
class Buffered:
    env: DeltaEnvelope
    staleness: int


@dataclass
class MergeOutcome:
    version: int
    updates: list[dict] = field(default_factory=list)


def merge_updates(
    experts: dict[str, np.ndarray], buffered: list[Buffered], agg: AggregationConfig
) -> tuple[dict[str, np.ndarray], list[float]]:
    """New expert weights from K buffered updates; returns them and each update's weight."""
    deltas, weights = [], []
    for item in buffered:
        delta = merge.update_deltas(item.env.adapter_pairs(), item.env.scale)
        if agg.clip_norm is not None:
            delta = strategies.clip_by_norm(delta, agg.clip_norm)
        deltas.append(delta)
        weights.append(strategies.staleness_weight(item.env.num_samples, item.staleness, agg.staleness_exponent))
    mean = merge.weighted_mean(deltas, weights)
    return merge.apply_delta(experts, mean, agg.server_lr), weights


class Aggregator:
    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.registry = ModelRegistry(cfg)
        self.devices = DeviceRegistry(cfg.device_registry, cfg.ca_cert)
        self.key = crypto.load_private_key(cfg.signing_key)
        self.version = 0
        self.parts: dict[str, dict[str, np.ndarray]] = {}
        self.model_cfg: ModelConfig = cfg.model
        self.buffer: list[Buffered] = []
        self.seen: set[str] = set()
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- state --
    def initialise(self) -> int:
        """Register version 1 from a fresh model when the registry is empty; returns the latest version."""
        latest = self.registry.latest_version()
        if latest is None:
            parts = partition_state(build_model(self.cfg.model))
            latest = self.registry.register(self.cfg.model, parts, {"kind": "init", "base_version": 0}, {})
            log.info("registered initial version v%d", latest)
        self._load(latest)
        return latest

    def _load(self, version: int) -> None:
        stored = self.registry.load(version)
        self.model_cfg, self.parts = stored.model, stored.parts
        self.version = version
        self._shapes = adapter_shapes(self.model_cfg)
        self.seen = self.registry.recent_update_ids(self.cfg.aggregation.staleness_limit + 2)

    def announcement(self) -> bytes:
        """Compile (if needed) and sign the announcement of the current version."""
        bundle_dir = self.cfg.bundle_dir / f"v{self.version}"
        if not (bundle_dir / bundle.MANIFEST).exists():
            compile_bundle(self.model_cfg, self.parts, self.version, self.cfg.bundle_dir, self.key)
        manifest = (bundle_dir / bundle.MANIFEST).read_bytes()
        ann = Announcement(
            version=self.version,
            bundle_url=(
                f"{self.cfg.bundle_base_url.rstrip('/')}/v{self.version}"
                if self.cfg.bundle_base_url
                else bundle_dir.resolve().as_uri()
            ),
            manifest_sha256=hashlib.sha256(manifest).hexdigest(),
            created_at=datetime.now(UTC).isoformat(),
        )
        return ann.encode(self.key)

    # -- pure-ish checks and merge --
    def admit(self, payload: bytes) -> Buffered:
        """Check one update against the current model; raise EnvelopeError with the reason to refuse it."""
        env = envelope.decode(payload)
        envelope.check_against_model(env, self._shapes)
        ident = self.devices.check_sender(env.device_id, env.device_id)  # enrolled, not revoked, CA-issued
        envelope.verify_signature(env, ident.signing_key)
        if env.update_id in self.seen or any(b.env.update_id == env.update_id for b in self.buffer):
            raise EnvelopeError("duplicate", f"update {env.update_id} was already merged or buffered")
        if env.base_version > self.version:
            raise EnvelopeError("future_base", f"base v{env.base_version} is newer than the model v{self.version}")
        age = strategies.staleness(self.version, env.base_version)
        if age > self.cfg.aggregation.staleness_limit:
            raise EnvelopeError(
                "stale",
                f"base v{env.base_version} is {age} versions behind v{self.version} "
                f"(limit {self.cfg.aggregation.staleness_limit})",
            )
        return Buffered(env, age)

    def merge_buffer(self) -> MergeOutcome:
        experts, weights = merge_updates(self.parts["experts"], self.buffer, self.cfg.aggregation)
        updates = [
            {"update_id": b.env.update_id, "device_id": b.env.device_id, "base_version": b.env.base_version,
             "num_samples": b.env.num_samples, "staleness": b.staleness, "weight": w}
            for b, w in zip(self.buffer, weights, strict=True)
        ]
        parts = {"core": self.parts["core"], "experts": experts, "adapters": {}}
        lineage = {"kind": "merge", "base_version": self.version, "updates": updates}
        metrics = {
            "updates_merged": float(len(updates)),
            "mean_staleness": float(np.mean([u["staleness"] for u in updates])),
            "mean_device_train_loss": float(
                np.mean([b.env.metrics.get("train_loss_last", np.nan) for b in self.buffer])
            ),
        }
        version = self.registry.register(self.model_cfg, parts, lineage, metrics)
        self.parts, self.version = parts, version
        self.seen.update(u["update_id"] for u in updates)
        self.buffer.clear()
        log.info("merged %d updates into v%d", len(updates), version)
        return MergeOutcome(version, updates)

    # -- the Kafka loop --
    async def run(
        self,
        max_versions: int | None = None,
        on_version: Callable[[MergeOutcome], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> int:
        """Consume until `max_versions` new versions exist (or forever); returns how many were made."""
        self.initialise()
        producer = AIOKafkaProducer(bootstrap_servers=self.cfg.kafka.bootstrap, acks="all", enable_idempotence=True)
        consumer = AIOKafkaConsumer(
            KAFKA_UPDATES,
            bootstrap_servers=self.cfg.kafka.bootstrap,
            group_id=self.cfg.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await producer.start()
        await consumer.start()
        made, uncommitted = 0, False
        try:
            announcement = await asyncio.to_thread(self.announcement)
            await producer.send_and_wait(KAFKA_ROUNDS, announcement, key=b"announce")
            while max_versions is None or made < max_versions:
                if stop is not None and stop.is_set():
                    break
                batch = await consumer.getmany(timeout_ms=500)
                uncommitted = uncommitted or bool(batch)
                for records in batch.values():
                    for record in records:
                        try:
                            self.buffer.append(self.admit(record.value))
                            log.info("buffered update %d/%d", len(self.buffer), self.cfg.aggregation.buffer_size)
                        except EnvelopeError as err:
                            log.warning("refused update at offset %d: %s", record.offset, err)
                            await producer.send_and_wait(
                                KAFKA_DEADLETTER, record.value, key=record.key,
                                headers=deadletter_headers("aggregator", err, f"{record.topic}@{record.offset}"),
                            )
                        if len(self.buffer) >= self.cfg.aggregation.buffer_size:
                            outcome = await asyncio.to_thread(self.merge_buffer)
                            announcement = await asyncio.to_thread(self.announcement)
                            await producer.send_and_wait(KAFKA_ROUNDS, announcement, key=b"announce")
                            made += 1
                            if on_version is not None:
                                on_version(outcome)
                if uncommitted and not self.buffer:
                    await consumer.commit()  # everything consumed is merged or dead-lettered
                    uncommitted = False
        finally:
            await consumer.stop()
            await producer.stop()
        return made
