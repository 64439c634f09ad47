"""Real Mosquitto and Kafka servers as local subprocesses, for integration tests and `make demo`.

Both listen on 127.0.0.1 only, at free ports picked at start, with all state in a work directory,
so several stacks can run side by side and nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from fednestd.shared import pki
from fednestd.shared.topics import KAFKA_TOPICS

LOOPBACK = "127.0.0.1"
BRIDGE_IDENTITY = "fednestd-bridge"
KAFKA_VERSION = "3.9.1"
_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


class ServerStartError(RuntimeError):
    """A local server exited or never became ready; the message carries the tail of its log."""


class KafkaTopicError(RuntimeError):
    """The broker refused to create a topic (for a reason other than it existing already)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDNESTD_CACHE") or Path.home() / ".cache" / "fednestd")


def kafka_libs_dir() -> Path:
    env = os.environ.get("FEDNESTD_KAFKA_LIBS")
    return Path(env) if env else cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


def free_port() -> int:
    """A port that was free a moment ago; callers retry if another process takes it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def mosquitto_acl(bridge_identity: str = BRIDGE_IDENTITY) -> str:
    """The broker ACL: usernames are certificate CNs, so `%u` is the device id."""
    # `pattern` lines apply to every user; plain `topic` lines before any `user` line would
    # apply to anonymous clients only, which is why the announce topic is a pattern too.
    return (
        "# devices: write only under their own id, read their control topic and announcements\n"
        "pattern write fl/v1/devices/%u/#\n"
        "pattern read fl/v1/devices/%u/control\n"
        "pattern read fl/v1/models/announce\n"
        "\n"
        "# the backend bridge: consumes every device's uplink, publishes announcements and control\n"
        f"user {bridge_identity}\n"
        "topic readwrite fl/v1/#\n"
    )


@dataclass
class DevPki:
    """A throwaway PKI laid out for the dev stack: CA, broker certificate, bridge identity, devices."""

    dir: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    bridge_cert: Path
    bridge_key: Path
    _devices: dict[str, tuple[Path, Path]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, root: Path, bridge_identity: str = BRIDGE_IDENTITY) -> DevPki:
        ca, ca_key = pki.create_ca(root)
        server_cert, server_key = pki.issue_server_cert(ca, ca_key, root)
        bridge_cert, bridge_key = pki.issue_client_cert(ca, ca_key, bridge_identity, root / "clients")
        return cls(root, ca, ca_key, server_cert, server_key, bridge_cert, bridge_key)

    def device(self, device_id: str) -> tuple[Path, Path]:
        """(cert, key) for `device_id`, issued on first use and reused afterwards."""
        if device_id not in self._devices:
            self._devices[device_id] = pki.issue_client_cert(
                self.ca, self.ca_key, device_id, self.dir / "clients"
            )
        return self._devices[device_id]


class _Subprocess(ABC):
    """Shared lifecycle: a child process whose stdout/stderr go to a log file in the work dir."""

    name = "server"

    def __init__(self, work_dir: Path | None) -> None:
        self._owns_work_dir = work_dir is None
        self.work_dir = (
            Path(tempfile.mkdtemp(prefix=f"fednestd-{self.name}-")) if work_dir is None else work_dir
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: list[str]) -> None:
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            argv, cwd=self.work_dir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerStartError(
                f"{self.name} exited with status {self._proc.returncode}; {self.log_path} ends with:\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the process and wait for it; kill it if it ignores SIGTERM for `timeout` s."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop, and remove the work dir if this object created it."""
        self.stop()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    @abstractmethod
    def start(self) -> None:
        """Launch the server and return once it accepts clients."""


class MosquittoServer(_Subprocess):
    """Mosquitto with mutual TLS: clients must present a certificate from `ca`; CN = username."""

    name = "mosquitto"

    def __init__(
        self,
        ca: Path,
        cert: Path,
        key: Path,
        work_dir: Path | None = None,
        *,
        bridge_identity: str = BRIDGE_IDENTITY,
        port: int = 0,
        binary: str | None = None,
    ) -> None:
        """`port` 0 picks a free one at each start; a fixed port lets a restart keep client settings."""
        super().__init__(work_dir)
        self.fixed_port = port
        self.ca, self.cert, self.key = Path(ca), Path(cert), Path(key)
        self.bridge_identity = bridge_identity
        self.binary = binary or os.environ.get("FEDNESTD_MOSQUITTO") or _find_mosquitto()
        self.host = LOOPBACK
        self.port = 0

    def config(self) -> str:
        # Started as root, Mosquitto drops to the `mosquitto` user, which cannot read 0600 keys or
        # pytest's 0700 tmp dirs. Naming the current user keeps it as who started it (a no-op
        # when not root), so the files can stay private to that user.
        user = pwd.getpwuid(os.getuid()).pw_name
        return (
            f"user {user}\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"acl_file {self.work_dir / 'acl'}\n"
            "persistence true\n"
            f"persistence_location {self.work_dir / 'data'}/\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
            "\n"
            f"listener {self.port} {self.host}\n"
            "protocol mqtt\n"
            f"cafile {self.ca}\n"
            f"certfile {self.cert}\n"
            f"keyfile {self.key}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
        )

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        for path in (self.ca, self.cert, self.key):
            if not path.is_file():
                raise FileNotFoundError(f"MosquittoServer: TLS file {path} does not exist")
        (self.work_dir / "data").mkdir(exist_ok=True)
        (self.work_dir / "acl").write_text(mosquitto_acl(self.bridge_identity))
        attempts = 1 if self.fixed_port else 3  # a picked port may be taken before mosquitto binds it
        for attempt in range(attempts):
            self.port = self.fixed_port or free_port()
            conf = self.work_dir / "mosquitto.conf"
            conf.write_text(self.config())
            self._spawn([self.binary, "-c", str(conf)])
            try:
                _wait_for_port(self, self.host, self.port, timeout)
                return
            except BaseException as exc:
                self.stop()
                port_taken = "Address already in use" in self.log_tail()
                if not isinstance(exc, ServerStartError) or not port_taken or attempt == attempts - 1:
                    raise


class KafkaServer(_Subprocess):
    """A single-node KRaft Kafka (broker and controller in one JVM) on loopback."""

    name = "kafka"

    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        libs: Path | None = None,
        heap: str = "512m",
        java: str | None = None,
    ) -> None:
        super().__init__(work_dir)
        self.libs = Path(libs) if libs else kafka_libs_dir()
        self.heap = heap
        self.java = java or shutil.which("java") or "java"
        self.host = LOOPBACK
        self.port = 0
        self.controller_port = 0
        self.startup_seconds: float | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def server_properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.work_dir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "log.retention.hours": "24",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def start(self, timeout: float = 120.0) -> None:
        if self.running:
            return
        if not any(self.libs.glob("kafka_2.13-*.jar")):
            raise FileNotFoundError(
                f"KafkaServer: no kafka_2.13 jar in {self.libs}; run `make kafka` or set FEDNESTD_KAFKA_LIBS"
            )
        began = time.monotonic()
        (self.work_dir / "log4j.properties").write_text(_LOG4J)
        self.port, self.controller_port = _two_free_ports()
        props = self.work_dir / "server.properties"
        props.write_text(self.server_properties())
        self._format_storage(props)
        self._spawn([*self._java_argv(), "kafka.Kafka", str(props)])
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        _wait_for_port(self, self.host, self.port, deadline - time.monotonic())
        while (error := _run_coroutine(_probe_kafka(self.bootstrap))) is not None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"kafka at {self.bootstrap} accepts connections but answers no metadata: {error}; "
                    f"{self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _java_argv(self) -> list[str]:
        return [
            self.java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",  # few GC threads: this runs on small, shared CI machines
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.work_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.work_dir / 'logs'}",
            "-cp",
            f"{self.libs}/*",
        ]

    def _format_storage(self, props: Path) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        argv = [*self._java_argv(), "kafka.tools.StorageTool", "format", "--ignore-formatted"]
        done = subprocess.run(
            [*argv, "-t", cluster_id, "-c", str(props)],
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise ServerStartError(
                f"kafka storage format failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )


async def bootstrap_topics(bootstrap: str, partitions: int = 1, timeout: float = 30.0) -> list[str]:
    """Create every topic in KAFKA_TOPICS that is missing; returns the ones this call created.

    Safe to repeat (existing topics are left alone) and to race with another caller. Returns only
    once the broker lists them all, so a producer started next will not see UNKNOWN_TOPIC.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in KAFKA_TOPICS if name not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in missing]
            )
            for topic, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(topic)
                elif code != _TOPIC_ALREADY_EXISTS:
                    message = rest[0] if rest else ""
                    raise KafkaTopicError(f"creating topic {topic!r} on {bootstrap}: error {code} {message}")
        deadline = time.monotonic() + timeout
        while not set(KAFKA_TOPICS) <= set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise KafkaTopicError(f"topics {list(KAFKA_TOPICS)} not all listed by {bootstrap}")
            await asyncio.sleep(0.2)
        return created
    finally:
        await admin.close()


_LOG4J = """\
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


async def _probe_kafka(bootstrap: str) -> str | None:
    """None when the broker answers a metadata request with itself in it, else why not."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
        return None if cluster.get("brokers") else "no brokers in metadata yet"
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await admin.close()


def _run_coroutine(coro: Coroutine[Any, Any, str | None]) -> str | None:
    """Run `coro` to completion even when the caller is itself inside an event loop (the demo)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _wait_for_port(server: _Subprocess, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server._check_alive()
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{server.name} did not accept connections on {host}:{port} within {timeout:.0f}s; "
                    f"{server.log_path} ends with:\n{server.log_tail()}"
                ) from None
            time.sleep(0.05)


def _two_free_ports() -> tuple[int, int]:
    # Hold both sockets open while picking so the two ports differ.
    with socket.socket() as a, socket.socket() as b:
        a.bind((LOOPBACK, 0))
        b.bind((LOOPBACK, 0))
        return int(a.getsockname()[1]), int(b.getsockname()[1])


def _find_mosquitto() -> str:
    # Debian puts the broker in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError("mosquitto not found on PATH or in /usr/sbin; run `make apt`")
    return found
