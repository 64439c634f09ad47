"""Device-side training: adapters only, on the artifacts the backend compiled.

`Trainer` is the seam for a second runtime (ExecuTorch); `make_trainer` picks one from config.
Nothing here imports torch: devices run without it.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fednestd.agent.ort_training import training_api
from fednestd.shared.config import ModelConfig, TrainConfig
from fednestd.shared.data import encode_stream, sample_batches, windows


@dataclass(frozen=True)
class TrainResult:
    adapters: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(ABC):
    """One installed model version, trainable on local text."""

    model: ModelConfig

    @abstractmethod
    def evaluate(self, texts: list[str]) -> float:
        """Mean next-byte cross-entropy over `texts` (nats)."""

    @abstractmethod
    def train(self, texts: list[str], cfg: TrainConfig) -> TrainResult:
        """Train the adapters; return their new values."""


class OrtTrainer(Trainer):
    """ONNX Runtime Training (`onnxruntime.training.api`): the default on Linux devices."""

    def __init__(self, bundle_dir: Path, threads: int = 1) -> None:
        api = training_api()
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        self._api = api
        self._dir = bundle_dir
        self.model = ModelConfig.model_validate(json.loads((bundle_dir / "manifest.json").read_text())["model"])
        self._state = api.CheckpointState.load_checkpoint(str(bundle_dir / "checkpoint"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # the one knob ORT training honours; the optimizer reuses it
        self._module = api.Module(
            str(bundle_dir / "training_model.onnx"),
            self._state,
            str(bundle_dir / "eval_model.onnx"),
            device="cpu",
            session_options=options,
        )
        self._optimizer = api.Optimizer(str(bundle_dir / "optimizer_model.onnx"), self._module)

    def evaluate(self, texts: list[str]) -> float:
        x, y = windows(encode_stream(texts), self.model.max_seq_len)
        self._module.eval()
        total, count = 0.0, 0
        for start in range(0, len(x), 16):
            xb, yb = x[start : start + 16], y[start : start + 16]
            loss = float(np.asarray(self._module(xb, yb.reshape(-1))))
            total += loss * yb.size
            count += yb.size
        return total / count

    def train(self, texts: list[str], cfg: TrainConfig) -> TrainResult:
        seq_len = min(cfg.seq_len, self.model.max_seq_len)
        batches = sample_batches(encode_stream(texts), seq_len, cfg.batch_size, cfg.steps, cfg.seed)
        self._optimizer.set_learning_rate(cfg.learning_rate)
        self._module.train()
        losses = []
        for xb, yb in batches:
            losses.append(float(np.asarray(self._module(xb, yb.reshape(-1)))))
            self._optimizer.step()
            self._module.lazy_reset_grad()
        return TrainResult(
            adapters=self.adapters(),
            num_samples=cfg.steps * cfg.batch_size,
            metrics={"train_loss_first": losses[0], "train_loss_last": float(np.mean(losses[-5:])),
                     "steps": float(cfg.steps)},
        )

    def adapters(self) -> dict[str, np.ndarray]:
        """Current adapter values, read back through a saved checkpoint (the API's supported path)."""
        self._module.copy_buffer_to_parameters(self._module.get_contiguous_parameters(trainable_only=True))
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "ckpt")
            self._api.CheckpointState.save_checkpoint(self._state, path)
            state = self._api.CheckpointState.load_checkpoint(path)
            return {
                name: np.array(param.data, dtype=np.float32)
                for name, param in state.parameters
                if name.endswith((".lora_A", ".lora_B"))
            }


def make_trainer(kind: str, bundle_dir: Path, threads: int = 1) -> Trainer:
    if kind == "ort":
        return OrtTrainer(bundle_dir, threads)
    raise ValueError(f"unknown trainer {kind!r}; available: 'ort'")
