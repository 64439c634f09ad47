"""Compile a model version into the signed device bundle: ORT training artifacts, adapters only.

ONNX export recipe from FEASIBILITY.md: TorchScript exporter (dynamo=False), opset 16 (17 emits a
LayerNormalization whose gradient ORT cannot build), training mode, no constant folding, so every
parameter stays a named initializer; onnx's IR version is lowered to 10 for ORT 1.19.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fednestd.shared import bundle
from fednestd.shared.config import ModelConfig
from fednestd.shared.model import MoEDecoder, build_model, load_partitions, partition_of

ORT_IR_VERSION = 10
TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def fresh_adapters(model: MoEDecoder, seed: int) -> None:
    """Every version starts devices from new adapters: A random (seeded), B zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora_A"):
                param.copy_(torch.randn(param.shape, generator=gen) / np.sqrt(param.shape[-1]))
            elif name.endswith(".lora_B"):
                param.zero_()


def export_training_onnx(model: MoEDecoder, path: Path, seq_len: int) -> None:
    dummy = torch.zeros(2, seq_len, dtype=torch.int64)
    model.flat_logits = True
    try:
        _export(model, dummy, path)
    finally:
        model.flat_logits = False


def _export(model: MoEDecoder, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "tokens"}},
        opset_version=16,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.TRAINING,
        export_params=True,
        dynamo=False,
    )


def build_training_artifacts(model: MoEDecoder, out_dir: Path) -> None:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)

    trainable = sorted(n for n, _ in model.named_parameters() if partition_of(n) == "adapters")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_training_onnx(model, onnx_path, model.cfg.max_seq_len)
        graph = onnx.load(str(onnx_path))
        names = {init.name for init in graph.graph.initializer}
        missing = set(trainable) - names
        if missing:
            raise RuntimeError(f"ONNX export lost adapter initializers: {sorted(missing)[:3]}")
        frozen = sorted(names - set(trainable))
        saved_ir = onnx.IR_VERSION
        onnx.IR_VERSION = ORT_IR_VERSION  # onnx 1.23 stamps IR 14 on the optimizer model; ORT 1.19 refuses it
        try:
            artifacts.generate_artifacts(
                graph,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=artifacts.OptimType.AdamW,
                artifact_directory=str(out_dir),
            )
        finally:
            onnx.IR_VERSION = saved_ir


def compile_bundle(
    cfg: ModelConfig,
    parts: dict[str, dict[str, np.ndarray]],
    version: int,
    out_dir: Path,
    key: Ed25519PrivateKey,
) -> Path:
    """Write `out_dir/v{version}` atomically (build in a sibling temp dir, then rename)."""
    model = build_model(cfg)
    load_partitions(model, {p: t for p, t in parts.items() if p != "adapters"})
    fresh_adapters(model, seed=cfg.seed * 1_000_003 + version)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"v{version}"
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=out_dir))
    try:
        build_training_artifacts(model, staging)
        bundle.seal(staging, version, cfg, datetime.now(UTC).isoformat(), key)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def bundle_server(bundle_dir: Path, host: str, port: int) -> ThreadingHTTPServer:
    """A read-only HTTP server for the bundle directory; devices verify what they fetch."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(bundle_dir))
    return ThreadingHTTPServer((host, port), handler)
