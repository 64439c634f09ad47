"""`fednestd-agent`: the device service and its local tools."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fednestd.shared.config import AgentConfig, ConfigError, load_config

app = typer.Typer(help="fednestd device agent", no_args_is_help=True, add_completion=False)
audit_app = typer.Typer(help="the local, tamper-evident audit log (never leaves the device)")
app.add_typer(audit_app, name="audit")
console = Console(stderr=True)

ConfigOpt = typer.Option(..., "--config", "-c", help="agent.yaml")


def _config(path: Path) -> AgentConfig:
    try:
        return load_config(path, AgentConfig)
    except ConfigError as exc:
        console.print(f"[red]config error[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def run(config: Path = ConfigOpt, verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the agent: wait for model announcements, train, and upload approved updates."""
    from fednestd.agent.daemon import Agent
    from fednestd.agent.uplink import Uplink

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    cfg = _config(config)
    uplink = Uplink(cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.ca, cfg.mqtt.cert, cfg.mqtt.key, client_id=cfg.device_id)
    Agent(cfg, uplink).run()


@app.command()
def status(config: Path = ConfigOpt) -> None:
    """Print the installed version, held-out losses and queued updates as JSON."""
    from fednestd.agent.outbox import Outbox

    cfg = _config(config)
    path = cfg.state_dir / "status.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["outbox_pending"] = len(Outbox(cfg.state_dir / "outbox.db"))
    typer.echo(json.dumps(data, indent=1, sort_keys=True))


@audit_app.command("verify")
def audit_verify(config: Path = ConfigOpt) -> None:
    """Check the audit log's hash chain; exit 1 if any row was edited or deleted."""
    from fednestd.agent.audit import AuditLog

    cfg = _config(config)
    report = AuditLog(cfg.state_dir / "audit.db").verify()
    for problem in report.problems:
        console.print(f"[red]{problem}[/red]")
    console.print(f"{report.rows} rows, chain {'intact' if report.ok else 'BROKEN'}")
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("show")
def audit_show(config: Path = ConfigOpt, event: str | None = typer.Option(None)) -> None:
    """List audit rows (optionally one event type)."""
    from fednestd.agent.audit import AuditLog

    cfg = _config(config)
    table = Table("seq", "ts", "event", "payload")
    for row in AuditLog(cfg.state_dir / "audit.db").rows(event):
        table.add_row(str(row["seq"]), row["ts"], row["event"], json.dumps(row["payload"], sort_keys=True)[:120])
    Console().print(table)


if __name__ == "__main__":
    app()
