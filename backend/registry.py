"""Model versions in MLflow: one registered model version per merged version, partitions as safetensors.

The registry is the durable point of a merge: once a version is registered, its lineage (the
update ids merged into it) is stored with it, and the aggregator rebuilds its dedup set from there.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fednestd.shared.checkpoint import Parts, load_parts, save_parts
from fednestd.shared.config import BackendConfig, ModelConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "fednestd-federation"


@dataclass(frozen=True)
class ModelVersion:
    version: int
    model: ModelConfig
    parts: Parts
    tags: dict[str, str]
    lineage: dict


class ModelRegistry:
    def __init__(self, cfg: BackendConfig) -> None:
        self._cfg = cfg
        self.name = cfg.registered_model
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.artifact_root.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        self._client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        self._experiment_id = (
            experiment.experiment_id
            if experiment
            else self._client.create_experiment(EXPERIMENT, artifact_location=cfg.artifact_root.resolve().as_uri())
        )
        try:
            self._client.get_registered_model(self.name)
        except mlflow.exceptions.MlflowException:
            self._client.create_registered_model(self.name, description="fednestd MoE decoder")

    def versions(self) -> list[int]:
        found = self._client.search_model_versions(f"name='{self.name}'")
        return sorted(int(v.version) for v in found)

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def register(self, cfg: ModelConfig, parts: Parts, lineage: dict, metrics: dict[str, float]) -> int:
        """Log the partitions and lineage as a run and register them as the next model version."""
        run = self._client.create_run(self._experiment_id, run_name=f"merge-{lineage.get('kind', 'merge')}")
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "model"
            root.mkdir()
            save_parts(parts, root)
            (root / "model_config.json").write_text(cfg.model_dump_json(indent=1))
            (root / "lineage.json").write_text(json.dumps(lineage, indent=1, sort_keys=True))
            self._client.log_artifacts(run_id, str(root), artifact_path="model")
        for key, value in metrics.items():
            self._client.log_metric(run_id, key, value)
        self._client.log_param(run_id, "base_version", lineage.get("base_version", 0))
        self._client.set_terminated(run_id)
        tags = {
            "fednestd.kind": str(lineage.get("kind", "merge")),
            "fednestd.base_version": str(lineage.get("base_version", 0)),
            "fednestd.updates": str(len(lineage.get("updates", []))),
            "fednestd.devices": str(len({u["device_id"] for u in lineage.get("updates", [])})),
        }
        mv = self._client.create_model_version(
            self.name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags
        )
        self._client.set_registered_model_alias(self.name, "candidate", mv.version)
        return int(mv.version)

    def load(self, version: int) -> ModelVersion:
        """One download of the version's artifacts: sizes, partitions and lineage together."""
        mv = self._client.get_model_version(self.name, str(version))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp))
            return ModelVersion(
                version=version,
                model=ModelConfig.model_validate_json((local / "model_config.json").read_text()),
                parts=load_parts(local),
                tags=dict(mv.tags),
                lineage=json.loads((local / "lineage.json").read_text()),
            )

    def lineage(self, version: int) -> dict:
        """Only the lineage file: dedup needs no weights."""
        mv = self._client.get_model_version(self.name, str(version))
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/lineage.json", dst_path=tmp)
            return json.loads(Path(path).read_text())

    def recent_update_ids(self, depth: int) -> set[str]:
        """Update ids merged into the last `depth` versions: older ones are refused as stale anyway."""
        ids: set[str] = set()
        for version in self.versions()[-depth:]:
            ids.update(u["update_id"] for u in self.lineage(version).get("updates", []))
        return ids

    def set_alias(self, alias: str, version: int) -> None:
        self._client.set_registered_model_alias(self.name, alias, str(version))

    def describe(self) -> list[dict[str, str]]:
        aliases: dict[str, list[str]] = {}
        for alias, version in self._client.get_registered_model(self.name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        rows = []
        for mv in sorted(self._client.search_model_versions(f"name='{self.name}'"), key=lambda v: int(v.version)):
            version = str(mv.version)
            rows.append({"version": version, "aliases": ",".join(sorted(aliases.get(version, []))), **dict(mv.tags)})
        return rows
