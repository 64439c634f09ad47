"""Load ONNX Runtime's on-device training API without torch.

onnxruntime-training 1.19.2's `onnxruntime/training/__init__.py` imports its `optim` subpackage,
which imports torch, so `from onnxruntime.training.api import ...` fails on a torch-free device.
The `api` subpackage itself needs no torch. When the package is not imported yet, register a bare
`onnxruntime.training` package module that points at the real directory (so its `__init__` never
runs) and import `api` from it. Where torch is installed and the package already loaded normally,
this changes nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


def training_api() -> Any:
    """The `onnxruntime.training.api` module (CheckpointState, Module, Optimizer)."""
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxruntime-training is not installed (plain onnxruntime has no training API)")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = package
    return importlib.import_module("onnxruntime.training.api")
