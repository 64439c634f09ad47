"""The MoE decoder shared by both tiers (torch; the backend uses it, devices run its ONNX export).

Parameter names carry the partition of ARCHITECTURE.md §1:
- adapters: `*.lora_A` / `*.lora_B` on every expert linear (trained on devices only);
- experts:  `blocks.{i}.moe.experts.{w_in,w_out}.weight`, grouped `[n_experts, out, in]`;
- core:     everything else (embeddings, attention, norms, router, head).

LoRA is hand-written rather than PEFT: experts are grouped tensors with one `bmm` per projection
(torchtune's `LoRAGroupedExperts` layout), which is what keeps ExecuTorch's XNNPACK training step
on par with eager (FEASIBILITY.md), and PEFT only targets grouped 3-D parameters through
`target_parameters`, a path not verified to export to ONNX Runtime training artifacts. The
aggregator also needs the raw A and B per expert for its product-space merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fednestd.shared.config import ModelConfig

PARTITIONS = ("core", "experts", "adapters")


def partition_of(name: str) -> str:
    if name.endswith((".lora_A", ".lora_B")):
        return "adapters"
    if ".moe.experts." in name:
        return "experts"
    return "core"


class GroupedLoRALinear(nn.Module):
    """`n` independent linears `[n, out, in]` plus a LoRA pair each: y_e = x W_e^T + s x A_e^T B_e^T."""

    def __init__(self, n: int, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.weight = nn.Parameter(torch.randn(n, d_out, d_in) / math.sqrt(d_in))
        # A random, B zero: a fresh adapter changes nothing until it is trained.
        self.lora_A = nn.Parameter(torch.randn(n, rank, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, N, in]
        base = torch.bmm(x, self.weight.transpose(1, 2))
        low = torch.bmm(torch.bmm(x, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))
        return base + self.scale * low


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_in = GroupedLoRALinear(cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.lora_rank, cfg.lora_alpha)
        self.w_out = GroupedLoRALinear(cfg.n_experts, cfg.d_ff, cfg.d_model, cfg.lora_rank, cfg.lora_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [E, N, d] -> [E, N, d]
        return self.w_out(F.gelu(self.w_in(x)))


class MoE(nn.Module):
    """Top-k routing by masking: every expert runs, non-top-k gate logits become -inf.

    The one formulation that exports and trains in ONNX Runtime and ExecuTorch alike.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.n_experts = cfg.n_experts
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        logits = self.gate(flat)
        kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
        masked = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
        weights = torch.softmax(masked, dim=-1)  # [N, E]
        out = self.experts(flat.unsqueeze(0).expand(self.n_experts, -1, -1))  # [E, N, d]
        mixed = (out * weights.transpose(0, 1).unsqueeze(-1)).sum(0)
        return mixed.reshape(b, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        causal = torch.triu(torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)  # additive: exports cleanly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads) + self.causal_mask[:t, :t]
        y = torch.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_moe = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.moe(self.ln_moe(x))


class MoEDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # ONNX Runtime's loss block wants 2-D logits [B*T, V]; the compiler sets this for export
        # instead of wrapping the model, so exported initializer names equal parameter names.
        self.flat_logits = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits.reshape(-1, logits.shape[-1]) if self.flat_logits else logits


def build_model(cfg: ModelConfig) -> MoEDecoder:
    torch.manual_seed(cfg.seed)
    return MoEDecoder(cfg)


def partition_state(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """Split parameters into the three partitions as numpy arrays (safetensors-ready)."""
    parts: dict[str, dict[str, np.ndarray]] = {p: {} for p in PARTITIONS}
    for name, param in model.named_parameters():
        parts[partition_of(name)][name] = param.detach().cpu().numpy().copy()
    return parts


def load_partitions(model: nn.Module, parts: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Load any subset of partitions; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for tensors in parts.values():
            for name, arr in tensors.items():
                if name not in params:
                    raise KeyError(f"model has no parameter {name!r}")
                if tuple(params[name].shape) != arr.shape:
                    raise ValueError(f"{name}: shape {arr.shape} does not match model {tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(np.asarray(arr)))


def adapter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names and shapes, computed without building a model."""
    shapes: dict[str, tuple[int, ...]] = {}
    dims = {"w_in": (cfg.d_model, cfg.d_ff), "w_out": (cfg.d_ff, cfg.d_model)}
    for i in range(cfg.n_layers):
        for lin, (d_in, d_out) in dims.items():
            base = f"blocks.{i}.moe.experts.{lin}"
            shapes[f"{base}.lora_A"] = (cfg.n_experts, cfg.lora_rank, d_in)
            shapes[f"{base}.lora_B"] = (cfg.n_experts, d_out, cfg.lora_rank)
    return shapes


def lm_loss(model: MoEDecoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
