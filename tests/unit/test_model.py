"""The shared MoE model: partition names, routing, fresh adapters, and per-partition safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fednestd.backend.compiler import fresh_adapters
from fednestd.shared.checkpoint import load_parts, save_parts
from fednestd.shared.config import ModelConfig
from fednestd.shared.model import MoE, adapter_shapes, build_model, load_partitions, partition_of, partition_state

CFG = ModelConfig()


def test_partitions_are_visible_in_the_names() -> None:
    parts = partition_state(build_model(CFG))
    assert set(parts["adapters"]) == set(adapter_shapes(CFG))
    assert {a.shape for a in parts["adapters"].values()} == set(adapter_shapes(CFG).values())
    assert sorted(parts["experts"]) == sorted(
        f"blocks.{i}.moe.experts.{lin}.weight" for i in range(CFG.n_layers) for lin in ("w_in", "w_out")
    )
    assert "blocks.0.moe.gate.weight" in parts["core"] and "tok_emb.weight" in parts["core"]
    assert partition_of("blocks.1.moe.experts.w_out.lora_B") == "adapters"


def test_top_k_masking_uses_exactly_k_experts() -> None:
    torch.manual_seed(0)
    moe = MoE(CFG)
    x = torch.randn(3, 5, CFG.d_model)
    logits = moe.gate(x.reshape(-1, CFG.d_model))
    kth = torch.topk(logits, CFG.top_k, dim=-1).values[:, -1:]
    weights = torch.softmax(torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits), dim=-1)
    assert ((weights > 0).sum(-1) == CFG.top_k).all()
    assert torch.allclose(weights.sum(-1), torch.ones(15))


def test_fresh_adapters_leave_the_function_unchanged() -> None:
    model = build_model(CFG).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    before = model(idx)
    fresh_adapters(model, seed=7)
    assert torch.allclose(model(idx), before)  # B = 0: the product B @ A is zero
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_A"))


def test_partitions_round_trip_through_safetensors(tmp_path: Path) -> None:
    source = build_model(CFG).eval()
    written = save_parts(partition_state(source), tmp_path)
    assert [p.name for p in written] == ["core.safetensors", "experts.safetensors"]
    target = build_model(CFG.model_copy(update={"seed": 99})).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    assert not torch.allclose(target(idx), source(idx))
    loaded = load_parts(tmp_path)
    assert loaded["adapters"] == {}
    load_partitions(target, loaded)
    fresh_adapters(source, seed=1)
    fresh_adapters(target, seed=2)
    np.testing.assert_allclose(target(idx).detach().numpy(), source(idx).detach().numpy(), rtol=1e-6, atol=1e-6)
