"""The device agent's cycle: announcement -> install -> train -> policy -> audit -> outbox -> uplink.

Announcements arrive on the MQTT network thread and are handed to the main loop through a queue,
so training never blocks keep-alives. Every step is recorded in the local audit log.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass

from fednestd.agent.audit import AuditLog
from fednestd.agent.outbox import Outbox
from fednestd.agent.sidecar import Decision, PolicyEngine, make_engine
from fednestd.agent.trainer import make_trainer
from fednestd.agent.updater import ModelUpdater, UpdateError
from fednestd.agent.uplink import Uplink, UplinkError, UplinkTimeout, UplinkUnreachable
from fednestd.shared import announce, crypto, envelope
from fednestd.shared.config import AgentConfig
from fednestd.shared.data import read_jsonl, split_heldout
from fednestd.shared.topics import MQTT_ANNOUNCE, updates_topic

log = logging.getLogger("fednestd.agent")


@dataclass(frozen=True)
class CycleResult:
    version: int
    heldout_loss: float
    decision: Decision | None
    update_id: str | None


def payload_manifest(env: envelope.DeltaEnvelope, encoded: bytes, topic: str) -> dict:
    """What the egress policy sees: the shape of the outbound payload, never its values."""
    return {
        "kind": "adapter_delta",
        "destination_topic": topic,
        "device_id": env.device_id,
        "fields": ["__metadata__", "tensors"],
        "tensors": [
            {"name": n, "dtype": "F32", "shape": list(a.shape), "nbytes": int(a.nbytes)}
            for n, a in sorted(env.tensors.items())
        ],
        "metadata": envelope.read_header(encoded)["__metadata__"],
        "total_bytes": len(encoded),
    }


class Agent:
    def __init__(self, cfg: AgentConfig, uplink: Uplink | None = None) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(cfg.state_dir / "audit.db")
        self.outbox = Outbox(cfg.state_dir / "outbox.db")
        self.policy: PolicyEngine = make_engine(cfg.policy_engine, list(cfg.policy_paths), cfg.policy_data or None)
        self.backend_key = crypto.load_public_key(cfg.backend_public_key)
        self.signing_key = crypto.load_private_key(cfg.signing_key)
        self.updater = ModelUpdater(cfg.state_dir / "bundles", self.backend_key)
        self.split = split_heldout(read_jsonl(cfg.data_path), cfg.train.heldout_fraction)
        self.uplink = uplink
        self._announcements: queue.Queue[bytes] = queue.Queue()
        self.status_path = cfg.state_dir / "status.json"
        self.status = json.loads(self.status_path.read_text()) if self.status_path.exists() else {
            "device_id": cfg.device_id, "installed_version": None, "evals": {}, "uploads": [], "rejected": []
        }

    # -- one cycle, usable without any network (tests drive it directly) --
    def handle_announcement(self, raw: bytes) -> CycleResult | None:
        try:
            ann = announce.decode(raw, self.backend_key)
        except announce.AnnouncementError as exc:
            self._reject("announcement", str(exc))
            return None
        installed = self.updater.installed_version()
        if installed is not None and ann.version <= installed:
            return None
        try:
            bundle_dir = self.updater.install(ann)
        except UpdateError as exc:
            self._reject(f"v{ann.version}", str(exc))
            return None
        self.audit.record("model_install", {"version": ann.version, "manifest_sha256": ann.manifest_sha256})
        trainer = make_trainer(self.cfg.trainer, bundle_dir, self.cfg.train.threads)
        heldout = trainer.evaluate(self.split.heldout)
        self.status["installed_version"] = ann.version
        self.status["evals"][str(ann.version)] = heldout
        self._save_status()
        log.info("installed v%d, held-out loss %.4f", ann.version, heldout)
        if self._final_version(ann.version):
            return CycleResult(ann.version, heldout, None, None)
        result = trainer.train(self.split.train, self.cfg.train)
        env = envelope.DeltaEnvelope(
            device_id=self.cfg.device_id,
            base_version=ann.version,
            rank=trainer.model.lora_rank,
            alpha=trainer.model.lora_alpha,
            num_samples=result.num_samples,
            tensors=result.adapters,
            metrics=result.metrics | {"heldout_loss_before": heldout},
            policy_revision=self.policy.revision,
        )
        encoded = envelope.encode(env, self.signing_key)
        topic = updates_topic(self.cfg.device_id)
        decision = self.policy.decide(payload_manifest(env, encoded, topic))
        self.audit.record(
            "policy_decision",
            {"update_id": env.update_id, "allow": decision.allow, "reasons": list(decision.reasons),
             "policy_revision": decision.policy_revision, "bytes": len(encoded)},
        )
        if not decision.allow:
            log.warning("policy denied update %s: %s", env.update_id, "; ".join(decision.reasons))
            return CycleResult(ann.version, heldout, decision, None)
        self.outbox.enqueue(env.update_id, topic, encoded)
        self.status["uploads"].append({"update_id": env.update_id, "base_version": ann.version, **result.metrics})
        self._save_status()
        return CycleResult(ann.version, heldout, decision, env.update_id)

    def flush_outbox(self) -> int:
        """Publish queued updates; each is deleted only after a successful PUBACK."""
        if self.uplink is None or not self.uplink.connected:
            return 0  # paho reconnects by itself; the outbox keeps everything meanwhile
        sent = 0
        for item in self.outbox.pending():
            try:
                result = self.uplink.publish(item.topic, item.payload)
            except UplinkError as exc:  # broker away: keep everything queued and retry next pass
                self.outbox.mark_attempt(item.update_id, str(exc))
                log.warning("upload of %s postponed: %s", item.update_id, exc)
                break
            if result.ok:
                self.outbox.delete(item.update_id)
                self.audit.record(
                    "export", {"update_id": item.update_id, "topic": item.topic, "bytes": len(item.payload)}
                )
                sent += 1
            else:
                self.outbox.mark_attempt(item.update_id, f"{result.reason_code} {result.reason}")
                log.warning("broker refused %s: %s", item.update_id, result.reason)
        return sent

    # -- the service loop --
    def run(self, poll_s: float = 0.5) -> None:
        if self.uplink is None:
            raise RuntimeError("the service loop needs an uplink")
        self._connect()
        self.uplink.subscribe(MQTT_ANNOUNCE, lambda _topic, payload: self._announcements.put(payload))
        rounds = 0
        try:
            while True:
                self.flush_outbox()
                try:
                    raw = self._announcements.get(timeout=poll_s)
                except queue.Empty:
                    continue
                result = self.handle_announcement(raw)
                if result is None:
                    continue
                if self._final_version(result.version):
                    return
                self.flush_outbox()
                if result.update_id is not None:
                    rounds += 1
                    if self.cfg.max_rounds is not None and rounds >= self.cfg.max_rounds and not len(self.outbox):
                        return
        finally:
            self.uplink.close()

    def _final_version(self, version: int) -> bool:
        return self.cfg.exit_after_version is not None and version >= self.cfg.exit_after_version

    def _connect(self, max_delay_s: float = 60.0) -> None:
        """Retry an unreachable broker with backoff; a refused certificate is fatal (systemd restarts us)."""
        assert self.uplink is not None
        delay = 1.0
        while True:
            try:
                self.uplink.connect()
                return
            except (UplinkUnreachable, UplinkTimeout) as exc:
                log.warning("broker not reachable (%s); retrying in %.0fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, max_delay_s)

    def _reject(self, what: str, reason: str) -> None:
        log.error("rejected %s: %s", what, reason)
        self.audit.record("model_rejected", {"what": what, "reason": reason})
        self.status["rejected"].append({"what": what, "reason": reason, "at": time.time()})
        self._save_status()

    def _save_status(self) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status, indent=1, sort_keys=True))
        tmp.replace(self.status_path)
