"""Every configuration file is a pydantic model: a bad file fails with the field and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file that cannot be used, with every offending field named."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Sizes of the MoE decoder; the same numbers must be used by the backend and every device."""

    vocab_size: int = Field(256, ge=2, description="byte-level vocabulary")
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_experts: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    d_ff: int = Field(128, ge=8)
    max_seq_len: int = Field(64, ge=2)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        return self

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8883, ge=1, le=65535)
    ca: Path = Path("pki/ca.pem")
    cert: Path
    key: Path


class TrainConfig(_Strict):
    steps: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=2)
    learning_rate: float = Field(1e-2, gt=0)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    threads: int = Field(1, ge=1)
    seed: int = 0


class AgentConfig(_Strict):
    """Tier 2: one device."""

    device_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    data_path: Path = Field(description="local JSONL, one {\"text\": ...} object per line")
    state_dir: Path = Field(description="bundles, outbox, audit log and status live here")
    signing_key: Path = Field(description="the device's Ed25519 private key (PEM)")
    backend_public_key: Path = Field(description="verifies model bundles and announcements")
    policy_paths: list[Path] = Field(min_length=1, description="Rego v1 egress policy files")
    policy_data: dict = Field(
        default_factory=dict, description="data document for the policy, e.g. {fednestd: {egress_config: ...}}"
    )
    policy_engine: Literal["rego"] = "rego"
    trainer: Literal["ort"] = "ort"
    mqtt: MqttConfig
    train: TrainConfig = TrainConfig()
    max_rounds: int | None = Field(None, ge=1, description="stop after this many uploads (tests, demos)")
    exit_after_version: int | None = Field(
        None, ge=1, description="stop once this model version is installed and evaluated"
    )


class KafkaConfig(_Strict):
    bootstrap: str = "127.0.0.1:9092"
    group_id: str = "fednestd-aggregator"


class AggregationConfig(_Strict):
    buffer_size: int = Field(2, ge=1, description="K: updates merged into one new version")
    staleness_limit: int = Field(3, ge=0, description="refuse updates whose base is older than this")
    staleness_exponent: float = Field(0.5, ge=0, description="weight = n * (1 + staleness) ** -a")
    clip_norm: float | None = Field(None, gt=0, description="per-update Frobenius norm bound")
    server_lr: float = Field(1.0, gt=0)


class BackendConfig(_Strict):
    """Tier 1: bridge, aggregator, registry and compiler; their files live under `state_dir`."""

    state_dir: Path = Path("run/backend")
    model: ModelConfig = ModelConfig()
    kafka: KafkaConfig = KafkaConfig()
    mqtt: MqttConfig
    ca_cert: Path = Field(Path("run/pki/ca.pem"), description="the CA that issued device certificates")
    mlflow_tracking_uri: str | None = Field(None, description="default: sqlite store in state_dir")
    registered_model: str = "fednestd-moe"
    aggregation: AggregationConfig = AggregationConfig()
    bundle_base_url: str | None = Field(
        None, description="where devices fetch bundles, e.g. https://models.example/bundles "
        "(served by `fednestd tier1 serve-bundles`); default: file:// paths for one-machine setups",
    )

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def signing_key(self) -> Path:
        return self.state_dir / "backend.key"

    @property
    def device_registry(self) -> Path:
        return self.state_dir / "devices"

    @property
    def bundle_dir(self) -> Path:
        return self.state_dir / "bundles"


C = TypeVar("C", bound=BaseModel)


def load_config(path: Path, schema: type[C]) -> C:
    """Parse a YAML file into `schema`, naming the file, each bad field and why."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = schema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
    return _resolve_paths(config, Path(path).resolve().parent)


def _resolve_paths(config: C, base: Path) -> C:
    """Relative paths in a file mean relative to that file, wherever the process was started."""
    updates: dict[str, object] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            updates[name] = [v if v.is_absolute() else base / v for v in value]
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base)
    return config.model_copy(update=updates)
