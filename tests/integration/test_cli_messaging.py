"""`fednestd messaging bootstrap-topics` against the real broker: creates the contract's topics, idempotently."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from fednestd.backend.cli import app
from fednestd.backend.devstack import KafkaServer
from fednestd.shared.topics import KAFKA_TOPICS


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_bootstrap_topics_cli(tmp_path: Path) -> None:
    with KafkaServer(tmp_path / "kafka") as kafka:  # a fresh broker: no topics yet
        cfg = tmp_path / "tier1.yaml"
        cfg.write_text(json.dumps({"kafka": {"bootstrap": kafka.bootstrap}, "mqtt": {"cert": "c", "key": "k"}}))
        runner = CliRunner()
        first = runner.invoke(app, ["messaging", "bootstrap-topics", "-c", str(cfg)])
        assert first.exit_code == 0, first.output
        assert set(KAFKA_TOPICS) <= asyncio.run(_topics(kafka.bootstrap))
        second = runner.invoke(app, ["messaging", "bootstrap-topics", "-c", str(cfg)])
        assert second.exit_code == 0 and "none (all existed)" in second.output
