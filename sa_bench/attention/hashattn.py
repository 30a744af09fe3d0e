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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_bench.attention.base import Context, KeyCache, TopKMasker, model_shapes
from sa_bench.config import ConfigError, Size, check_range

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


@dataclass
class HashAttention(TopKMasker):
    """HashAttention top-k (Desai et al., 2024, https://arxiv.org/abs/2412.14468).

    Per layer and kv head, learned MLPs f, g map q and k to `bits`-bit sign signatures;
    score(q, k) = #agreeing bits = (bits + sign(f(q)) . sign(g(k))) / 2; top-k by score.
    Key signatures are cached across decode steps. `weights`: safetensors file written by
    `python -m sa_bench.attention.train_hashattn`; null = random-projection signatures
    f = g = x R, R Gaussian [d, bits] per layer/kv head (SimHash), labelled in the notes.
    """

    heavy_size: Size = 0.1
    weights: str | None = None
    bits: int = 32
    seed: int = 0
    _sigs: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _w: HashWeights | None = field(default=None, init=False, repr=False)
    _proj: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.bits, "bits", 1, 1024)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"weights: hashattn weights file not found: {self.weights}")

    def prepare(self, model_config, key: str) -> None:
        if self.weights is None:
            return
        layers, _, kv_heads, head_dim = model_shapes(model_config)
        w = HashWeights.load(self.weights, f"{key}.weights")
        w.check(layers, kv_heads, head_dim, f"{key}.weights")
        self._w = w

    def notes(self) -> list[str]:
        if self._w is None:
            return [f"hashattn: random-projection signatures ({self.bits} bits, no weights file)"]
        return [f"hashattn: learned signatures from {self.weights} ({self._w.bits} bits)"]

    def _project(self, side: str, layer: int, x: Tensor) -> Tensor:
        if self._w is not None:
            if self._w.tensors["query.w1"].device != x.device:
                self._w = self._w.to(x.device)
            return self._w.project(side, layer, x)
        r = self._proj.get(layer)
        if r is None or r.device != x.device:
            g = torch.Generator().manual_seed(self.seed * 100003 + layer)
            r = torch.randn(x.shape[1], x.shape[-1], self.bits, generator=g).to(x.device)
            self._proj[layer] = r
        return torch.matmul(x, r.to(x.dtype).unsqueeze(0))

    def score(self, ctx: Context) -> Tensor:
        def sign(x: Tensor) -> Tensor:
            return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)

        sk = self._sigs.get(ctx.layer, ctx.key, ctx.query.shape[2],
                            lambda k: sign(self._project("key", ctx.layer, k)))
        sq = sign(self._project("query", ctx.layer, ctx.grouped(ctx.query)))
        agree = torch.matmul(sq, sk.transpose(-1, -2))  # +-1 dot product, [b, Hk, g*q, kv]
        return ctx.ungrouped(agree)
