"""`fednestd`: the operators' and backend's command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fednestd.backend import templates
from fednestd.shared.config import AgentConfig, BackendConfig, ConfigError, load_config

app = typer.Typer(help="fednestd: federated, nested learning of MoE models", no_args_is_help=True,
                  add_completion=False)
tier1 = typer.Typer(help="data-center tier: aggregation, bridge, models", no_args_is_help=True)
tier2 = typer.Typer(help="edge tier: run a device client in-process", no_args_is_help=True)
messaging = typer.Typer(help="Kafka topics", no_args_is_help=True)
devices = typer.Typer(help="enrolled devices", no_args_is_help=True)
models = typer.Typer(help="model versions in the registry", no_args_is_help=True)
pki_app = typer.Typer(help="certificate authority for brokers, bridge and devices", no_args_is_help=True)
for sub, name in ((tier1, "tier1"), (tier2, "tier2"), (messaging, "messaging"), (devices, "devices"),
                  (models, "models"), (pki_app, "pki")):
    app.add_typer(sub, name=name)

console = Console(stderr=True)
ConfigOpt = typer.Option(Path("tier1.yaml"), "--config", "-c", help="tier-1 config file")


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def _backend(path: Path) -> BackendConfig:
    try:
        return load_config(path, BackendConfig)
    except ConfigError as exc:
        console.print(f"[red]config error[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command("init-config")
def init_config(
    tier: str = typer.Argument(..., help="tier1 (backend) or tier2 (device)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write here instead of stdout"),
) -> None:
    """Write a commented, valid starter config."""
    text = {"tier1": templates.TIER1, "tier2": templates.TIER2}.get(tier)
    if text is None:
        console.print(f"[red]unknown tier {tier!r}[/red]: expected tier1 or tier2")
        raise typer.Exit(2)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


@app.command("check-config")
def check_config(path: Path, tier: str = typer.Option("tier1", help="tier1 or tier2")) -> None:
    """Validate a config file; print the field and reason of every problem."""
    schema = BackendConfig if tier == "tier1" else AgentConfig
    try:
        load_config(path, schema)
    except ConfigError as exc:
        console.print(f"[red]invalid[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"{path}: valid {tier} config")


@pki_app.command("init")
def pki_init(
    config: Path = ConfigOpt, force: bool = typer.Option(False, help="replace an existing CA and key")
) -> None:
    """Create the CA, the broker and bridge certificates, and the backend signing key."""
    from fednestd.backend.devstack import DevPki
    from fednestd.shared import crypto

    cfg = _backend(config)
    existing = [p for p in (cfg.ca_cert, cfg.signing_key) if p.exists()]
    if existing and not force:
        console.print(f"[red]refusing to replace {', '.join(map(str, existing))}[/red]: every enrolled device "
                      "trusts them; pass --force to start a new PKI")
        raise typer.Exit(1)
    DevPki.create(cfg.ca_cert.parent)
    crypto.generate_signing_key(cfg.signing_key)
    console.print(f"CA and certificates in {cfg.ca_cert.parent}; backend key {cfg.signing_key}")


@messaging.command("bootstrap-topics")
def bootstrap_topics(config: Path = ConfigOpt) -> None:
    """Create the Kafka topics of the wire contract (idempotent)."""
    from fednestd.backend.devstack import bootstrap_topics as create

    cfg = _backend(config)
    created = asyncio.run(create(cfg.kafka.bootstrap))
    console.print(f"created: {', '.join(created) or 'none (all existed)'}")


@devices.command("enroll")
def devices_enroll(
    device_id: str,
    data: Path = typer.Option(..., help="the device's local JSONL data"),
    out: Path = typer.Option(..., help="directory for the device kit"),
    policy: list[Path] = typer.Option([Path("policies/egress.rego")], help="egress policy files (copied into the kit)"),
    state_dir: str = typer.Option("/var/lib/fednestd", help="the agent's writable state on the device"),
    config: Path = ConfigOpt,
) -> None:
    """Issue a device certificate and signing key; write its kit with agent.yaml."""
    from fednestd.backend.devices import DeviceRegistry, EnrollmentError
    from fednestd.shared import crypto

    cfg = _backend(config)
    try:
        path = DeviceRegistry(cfg.device_registry, cfg.ca_cert).enroll(
            device_id, cfg.ca_cert.parent / "ca.key", out, crypto.public_key_path(cfg.signing_key),
            cfg.mqtt.host, cfg.mqtt.port, data, policy, state_dir,
        )
    except EnrollmentError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"enrolled {device_id}: {path}")


@devices.command("list")
def devices_list(config: Path = ConfigOpt) -> None:
    from fednestd.backend.devices import DeviceRegistry

    cfg = _backend(config)
    table = Table("device", "status")
    for row in DeviceRegistry(cfg.device_registry, cfg.ca_cert).list():
        table.add_row(row["device_id"], row["status"])
    Console().print(table)


@devices.command("revoke")
def devices_revoke(device_id: str, config: Path = ConfigOpt) -> None:
    """Refuse every further update from this device."""
    from fednestd.backend.devices import DeviceRegistry
    from fednestd.shared.envelope import EnvelopeError

    cfg = _backend(config)
    try:
        DeviceRegistry(cfg.device_registry, cfg.ca_cert).revoke(device_id)
    except EnvelopeError as exc:
        console.print(f"[red]{exc.detail}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"revoked {device_id}: its updates are refused from now on")


@tier1.command("init-model")
def init_model(config: Path = ConfigOpt) -> None:
    """Register version 1 (if the registry is empty) and compile its device bundle."""
    from fednestd.backend.aggregator import Aggregator

    _logging()
    agg = Aggregator(_backend(config))
    version = agg.initialise()
    agg.announcement()
    console.print(f"model v{version} registered and compiled")


@tier1.command("aggregate-experts")
def aggregate_experts(
    config: Path = ConfigOpt,
    max_versions: int | None = typer.Option(None, help="exit after this many new versions"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Consume edge updates from Kafka and merge them into new expert versions."""
    from fednestd.backend.aggregator import Aggregator

    _logging(verbose)
    made = asyncio.run(Aggregator(_backend(config)).run(max_versions=max_versions))
    console.print(f"made {made} new versions")


@tier1.command("bridge")
def bridge(
    config: Path = ConfigOpt,
    client_id: str = typer.Option("fednestd-bridge", help="unique per bridge instance; keep it across restarts"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Bridge device updates MQTT -> Kafka and announcements Kafka -> MQTT."""
    from fednestd.backend.bridge import Bridge

    _logging(verbose)
    asyncio.run(Bridge(_backend(config), client_id=client_id).run())


@tier1.command("serve-bundles")
def serve_bundles(
    config: Path = ConfigOpt,
    host: str = typer.Option("127.0.0.1", help="bind address (put TLS in front for a fleet)"),
    port: int = typer.Option(8080),
) -> None:
    """Serve compiled bundles over HTTP for `bundle_base_url` (integrity comes from the signed manifest)."""
    from fednestd.backend.compiler import bundle_server

    cfg = _backend(config)
    cfg.bundle_dir.mkdir(parents=True, exist_ok=True)
    server = bundle_server(cfg.bundle_dir, host, port)
    console.print(f"serving {cfg.bundle_dir} on http://{host}:{server.server_address[1]}/")
    server.serve_forever()


@tier2.command("run-client")
def run_client(config: Path = typer.Option(..., "--config", "-c", help="agent.yaml")) -> None:
    """Run a device agent in this process (same as `fednestd-agent run`)."""
    from fednestd.agent.cli import run

    run(config=config, verbose=False)


@models.command("list")
def models_list(config: Path = ConfigOpt) -> None:
    from fednestd.backend.registry import ModelRegistry

    table = Table("version", "aliases", "kind", "base", "updates", "devices")
    for row in ModelRegistry(_backend(config)).describe():
        table.add_row(row["version"], row["aliases"], row.get("fednestd.kind", ""),
                      row.get("fednestd.base_version", ""), row.get("fednestd.updates", ""),
                      row.get("fednestd.devices", ""))
    Console().print(table)


@models.command("promote")
def models_promote(version: int, config: Path = ConfigOpt, alias: str = "champion") -> None:
    """Point an alias (default `champion`) at a version."""
    from fednestd.backend.registry import ModelRegistry

    ModelRegistry(_backend(config)).set_alias(alias, version)
    console.print(f"{alias} -> v{version}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-run"), help="wiped and recreated"),
    devices_n: int = typer.Option(3, "--devices"),
    versions: int = typer.Option(3, help="new model versions to wait for"),
) -> None:
    """A local federation: Mosquitto, Kafka, backend and device agents on Shakespeare roles."""
    from fednestd.backend.demo import run_demo

    run_demo(workdir, devices_n, versions)


if __name__ == "__main__":
    app()
