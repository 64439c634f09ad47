"""`make demo`: a local federation on embedded defaults, with progress, a results table and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fednestd.backend.devstack import DevPki, KafkaServer, MosquittoServer
from fednestd.backend.federation import Federation, fresh_dir
from fednestd.backend.registry import ModelRegistry, ModelVersion
from fednestd.backend.shakespeare import partition_roles, write_jsonl
from fednestd.shared.config import AggregationConfig, BackendConfig, load_config
from fednestd.shared.data import encode_stream, read_jsonl, split_heldout, windows
from fednestd.shared.model import build_model, lm_loss, load_partitions

TRAIN = {"steps": 40, "batch_size": 8, "seq_len": 64, "learning_rate": 0.01, "heldout_fraction": 0.1}


def heldout_loss(stored: ModelVersion, texts: list[str]) -> float:
    """Backend-side evaluation of one version on one device's held-out lines (torch, same math)."""
    model = build_model(stored.model)
    load_partitions(model, stored.parts)
    model.eval()
    x, y = windows(encode_stream(texts), stored.model.max_seq_len)
    with torch.no_grad():
        return float(lm_loss(model, torch.from_numpy(x), torch.from_numpy(y)))


def plot_losses(losses: dict[str, list[float]], versions: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for device, values in losses.items():
        ax.plot(versions, values, marker="o", label=device)
    ax.set_xlabel("model version")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("fednestd demo: each device's held-out loss per version")
    ax.set_xticks(versions)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(workdir: Path, n_devices: int = 3, versions: int = 3, timeout: float = 900) -> list[dict]:
    console = Console()
    root = fresh_dir(workdir.resolve())
    device_ids = [f"device-{i + 1}" for i in range(n_devices)]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        setup = progress.add_task("starting Mosquitto (mTLS) and Kafka (KRaft)", total=3)
        pki = DevPki.create(root / "pki")
        mosquitto = MosquittoServer(pki.ca, pki.server_cert, pki.server_key, root / "mosquitto")
        kafka = KafkaServer(root / "kafka")
        mosquitto.start()
        progress.advance(setup)
        kafka.start()
        progress.advance(setup)
        fed = Federation(root, pki, mosquitto, kafka, aggregation=AggregationConfig(buffer_size=2))
        try:
            fed.write_backend_config()
            heldout: dict[str, list[str]] = {}
            for device_id, roles in zip(device_ids, partition_roles(n_devices, 4, 2000), strict=True):
                data = root / "data" / f"{device_id}.jsonl"
                write_jsonl(roles, data)
                fed.enroll(device_id, data, TRAIN)
                heldout[device_id] = split_heldout(read_jsonl(data), TRAIN["heldout_fraction"]).heldout
                console.print(f"{device_id}: roles {', '.join(roles)}")
            fed.init_model()
            progress.advance(setup)
            fed.start_backend(max_versions=versions)
            for device_id in device_ids:
                fed.start_agent(device_id)

            registry = ModelRegistry(load_config(fed.tier1_path, BackendConfig))
            task = progress.add_task("new model versions registered", total=versions)
            deadline = time.monotonic() + timeout
            while len(registry.versions()) - 1 < versions:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(registry.versions()) - 1} of {versions} versions in {timeout}s")
                fed.check_alive()
                progress.update(task, completed=len(registry.versions()) - 1)
                time.sleep(1)
            progress.update(task, completed=versions)
        finally:
            fed.stop()
            kafka.stop()
            mosquitto.stop()

    all_versions = registry.versions()
    stored = {v: registry.load(v) for v in all_versions}
    losses = {d: [heldout_loss(stored[v], heldout[d]) for v in all_versions] for d in device_ids}
    rows = []
    table = Table(title="fednestd demo: held-out loss (nats/byte) before -> after each merge")
    table.add_column("version")
    table.add_column("updates merged (device@base)")
    for device_id in device_ids:
        table.add_column(device_id)
    table.add_column("mean")
    for i, version in enumerate(all_versions[1:], 1):
        lineage = stored[version].lineage
        merged = ", ".join(f"{u['device_id'].removeprefix('device-')}@v{u['base_version']}" for u in lineage["updates"])
        before = [losses[d][i - 1] for d in device_ids]
        after = [losses[d][i] for d in device_ids]
        table.add_row(f"v{version}", f"{len(lineage['updates'])} ({merged})",
                      *(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after, strict=True)),
                      f"{np.mean(before):.3f} -> {np.mean(after):.3f}")
        rows.append({"version": version, "updates": lineage["updates"],
                     "before": dict(zip(device_ids, before, strict=True)),
                     "after": dict(zip(device_ids, after, strict=True))})
    Console(width=max(console.width, 110)).print(table)
    plot_losses(losses, all_versions, root / "heldout_loss.png")
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    console.print(f"plot: {root / 'heldout_loss.png'}   results: {root / 'results.json'}   logs: {root}/*.log")
    return rows

