"""A whole federation on one machine: the harness behind `make demo` and the end-to-end test.

Servers (Mosquitto, Kafka) are passed in or started here; backend services and device agents run
as real separate processes, talking only through the brokers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fednestd.backend.devices import DeviceRegistry
from fednestd.backend.devstack import DevPki, KafkaServer, MosquittoServer, bootstrap_topics
from fednestd.shared import crypto
from fednestd.shared.config import AggregationConfig, BackendConfig, ModelConfig, load_config

REPO_POLICY = Path(__file__).resolve().parents[1] / "policies" / "egress.rego"


def agent_command() -> list[str]:
    """The device agent, from the device-only venv when one is configured (`FEDNESTD_AGENT_PYTHON`)."""
    python = os.environ.get("FEDNESTD_AGENT_PYTHON") or sys.executable
    return [python, "-m", "fednestd.agent.cli"]


def backend_command() -> list[str]:
    return [sys.executable, "-m", "fednestd.backend.cli"]


@dataclass
class Federation:
    root: Path
    pki: DevPki
    mosquitto: MosquittoServer
    kafka: KafkaServer
    model: ModelConfig = field(default_factory=ModelConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    policy: Path = REPO_POLICY
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_configs: dict[str, Path] = field(default_factory=dict)

    @property
    def tier1_path(self) -> Path:
        return self.root / "tier1.yaml"

    def write_backend_config(self) -> BackendConfig:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = {
            "state_dir": str(self.root / "backend"),
            "ca_cert": str(self.pki.ca),
            "model": self.model.model_dump(),
            # A group per federation: several federations may share one test broker.
            "kafka": {"bootstrap": self.kafka.bootstrap, "group_id": f"agg-{uuid.uuid4().hex[:12]}"},
            "mqtt": {"host": self.mosquitto.host, "port": self.mosquitto.port, "ca": str(self.pki.ca),
                     "cert": str(self.pki.bridge_cert), "key": str(self.pki.bridge_key)},
            "aggregation": self.aggregation.model_dump(),
        }
        self.tier1_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        backend = load_config(self.tier1_path, BackendConfig)
        if not backend.signing_key.exists():
            crypto.generate_signing_key(backend.signing_key)
        asyncio.run(bootstrap_topics(self.kafka.bootstrap))
        return backend

    def enroll(self, device_id: str, data: Path, train: dict | None = None) -> Path:
        backend = load_config(self.tier1_path, BackendConfig)
        kit = self.root / "devices" / device_id
        path = DeviceRegistry(backend.device_registry, backend.ca_cert).enroll(
            device_id, self.pki.ca_key, kit, crypto.public_key_path(backend.signing_key),
            self.mosquitto.host, self.mosquitto.port, data, [self.policy],
        )
        if train:
            cfg = yaml.safe_load(path.read_text())
            cfg["train"] = train
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.agent_configs[device_id] = path
        return path

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        self.procs[name] = proc
        return proc

    def init_model(self) -> None:
        subprocess.run([*backend_command(), "tier1", "init-model", "-c", str(self.tier1_path)], check=True,
                       cwd=self.root, capture_output=True)

    def start_backend(self, max_versions: int | None = None) -> None:
        self.start_bridge()
        self.start_aggregator(max_versions)

    def start_bridge(self) -> subprocess.Popen[bytes]:
        return self._spawn("bridge", [*backend_command(), "tier1", "bridge", "-c", str(self.tier1_path)])

    def start_aggregator(self, max_versions: int | None = None, name: str = "aggregator") -> subprocess.Popen[bytes]:
        extra = ["--max-versions", str(max_versions)] if max_versions else []
        return self._spawn(name, [*backend_command(), "tier1", "aggregate-experts", "-c", str(self.tier1_path), *extra])

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_agent(self, device_id: str) -> subprocess.Popen[bytes]:
        return self._spawn(f"agent-{device_id}", [*agent_command(), "run", "-c", str(self.agent_configs[device_id])])

    def agent_status(self, device_id: str) -> dict:
        path = self.agent_configs[device_id].parent / "state" / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code not in (None, 0):
                tail = (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {code}:\n{tail}")

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            self.check_alive()
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


