"""HashAttention signature functions and their safetensors file format.

HashAttention (Desai et al., 2024, https://arxiv.org/abs/2412.14468): per layer l and kv head
h, two small MLPs map a query and a key to `bits` real numbers,

    f(x) = W2 silu(W1 x + b1) + b2,

and the signature is sign(f(x)) in {-1, +1}^bits. A query scores a key by the number of
agreeing bits, (bits + sign(f(q)) . sign(g(k))) / 2.

File (`safetensors`, metadata {"format": "sa_bench.hashattn.v1"}): for `side` in query, key:
`{side}.w1` [L, Hk, d, m], `{side}.b1` [L, Hk, m], `{side}.w2` [L, Hk, m, bits],
`{side}.b2` [L, Hk, bits].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_bench.config import ConfigError

FORMAT = "sa_bench.hashattn.v1"
SIDES = ("query", "key")
PARTS = ("w1", "b1", "w2", "b2")


@dataclass
class HashWeights:
    """Stacked MLP weights: tensors[f"{side}.{part}"], shapes as in the module docstring."""

    tensors: dict[str, Tensor]

    @property
    def bits(self) -> int:
        return self.tensors["query.w2"].shape[-1]

    @classmethod
    def init(cls, layers: int, kv_heads: int, head_dim: int, bits: int = 32, hidden: int = 64,
             seed: int = 0) -> HashWeights:
        """Random initial weights (the training command starts from these)."""
        g = torch.Generator().manual_seed(seed)
        t = {}
        for side in SIDES:
            t[f"{side}.w1"] = torch.randn(layers, kv_heads, head_dim, hidden, generator=g) / head_dim**0.5
            t[f"{side}.b1"] = torch.zeros(layers, kv_heads, hidden)
            t[f"{side}.w2"] = torch.randn(layers, kv_heads, hidden, bits, generator=g) / hidden**0.5
            t[f"{side}.b2"] = torch.zeros(layers, kv_heads, bits)
        return cls(t)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: str | Path, key: str) -> HashWeights:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise ConfigError(f"{key}: hashattn weights file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            expected = {f"{s}.{p}" for s in SIDES for p in PARTS}
            if meta.get("format") != FORMAT or names != expected:
                raise ConfigError(
                    f"{key}: {path} is not a {FORMAT} file (tensors {sorted(names)}, "
                    f"metadata {meta}); expected tensors {sorted(expected)}")
            return cls({name: f.get_tensor(name) for name in names})

    def check(self, layers: int, kv_heads: int, head_dim: int, key: str) -> None:
        """Raise ConfigError unless every tensor fits a model with these attention shapes."""
        hidden = self.tensors["query.w1"].shape[-1]
        bits = self.bits
        for side in SIDES:
            want = {"w1": (layers, kv_heads, head_dim, hidden), "b1": (layers, kv_heads, hidden),
                    "w2": (layers, kv_heads, hidden, bits), "b2": (layers, kv_heads, bits)}
            for part, shape in want.items():
                got = tuple(self.tensors[f"{side}.{part}"].shape)
                if got != shape:
                    raise ConfigError(
                        f"{key}: tensor {side}.{part} has shape {list(got)}, but the model needs "
                        f"{list(shape)} (layers={layers}, kv_heads={kv_heads}, head_dim={head_dim}, "
                        f"hidden={hidden}, bits={bits})")

    def project(self, side: str, layer: int, x: Tensor) -> Tensor:
        """f(x) for x [b, Hk, n, d] (rows already grouped per kv head) -> [b, Hk, n, bits]."""
        t = {p: self.tensors[f"{side}.{p}"][layer].to(x.device, x.dtype) for p in PARTS}
        h = F.silu(torch.matmul(x, t["w1"].unsqueeze(0)) + t["b1"][None, :, None, :])
        return torch.matmul(h, t["w2"].unsqueeze(0)) + t["b2"][None, :, None, :]

    def to(self, device) -> HashWeights:
        return HashWeights({k: v.to(device) for k, v in self.tensors.items()})
