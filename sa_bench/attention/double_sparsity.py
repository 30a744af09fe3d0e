"""Double Sparsity: top-k by approximate scores from a few outlier channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sa_bench.attention.base import Context, KeyCache, TopKMasker, model_shapes
from sa_bench.config import ConfigError, Size, check_range


@dataclass
class DoubleSparsity(TopKMasker):
    """Double Sparsity (Yang et al., 2024, https://arxiv.org/abs/2408.07092): approximate
    scores from r outlier channels C_h per query head, s_j = sum_{c in C_h} q_c k_jc, then top-k.

    `calibration`: safetensors file from `python -m sa_bench.attention.calibrate_ds` with
    `channel_rank` [L, H, d] (channels by importance, per layer and query head). null = the
    documented fallback: channels ranked per head by mean|q_c| * mean|k_c| over the first
    sparse call's queries and the keys then in the cache (calibration on the context itself).
    The key channels ("label cache") are cached across decode steps.
    """

    heavy_size: Size = 0.1
    channels: int = 16
    calibration: str | None = None
    _labels: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _rank: Tensor | None = field(default=None, init=False, repr=False)
    _online: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.channels, "channels", 1)
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ConfigError(f"calibration: double-sparsity calibration file not found: "
                              f"{self.calibration}")

    def prepare(self, model_config, key: str) -> None:
        if self.calibration is None:
            return
        from safetensors.torch import load_file

        layers, heads, _, head_dim = model_shapes(model_config)
        rank = load_file(self.calibration).get("channel_rank")
        want = (layers, heads, head_dim)
        if rank is None or tuple(rank.shape) != want:
            got = None if rank is None else list(rank.shape)
            raise ConfigError(f"{key}.calibration: channel_rank has shape {got}, but the model "
                              f"needs {list(want)} (layers, heads, head_dim)")
        if self.channels > head_dim:
            raise ConfigError(f"{key}.channels: {self.channels} > head_dim {head_dim}")
        self._rank = rank

    def reset(self) -> None:
        super().reset()
        self._online.clear()

    def notes(self) -> list[str]:
        if self._rank is None:
            return ["double_sparsity: channels calibrated online on each context (no calibration file)"]
        return [f"double_sparsity: channels from {self.calibration}"]

    def _channels(self, ctx: Context) -> Tensor:
        """Channel indices [H, r] for this layer."""
        if self._rank is not None:
            return self._rank[ctx.layer, :, : self.channels].to(ctx.key.device)
        ch = self._online.get(ctx.layer)
        if ch is None:
            kmag = ctx.key.abs().float().mean((0, 2)).repeat_interleave(ctx.groups, 0)  # [H, d]
            qmag = ctx.query.abs().float().mean((0, 2))
            ch = self._online[ctx.layer] = (qmag * kmag).argsort(-1, descending=True)[:, : self.channels]
        return ch

    def score(self, ctx: Context) -> Tensor:
        ch = self._channels(ctx)  # [H, r]
        b, h, q, d = ctx.query.shape
        r = ch.shape[-1]

        def labels(k: Tensor) -> Tensor:  # [b, Hk, n, d] -> [b, H, n, r]
            k = k.repeat_interleave(ctx.groups, 1)
            return k.gather(-1, ch[None, :, None, :].expand(b, h, k.shape[2], r))

        lab = self._labels.get(ctx.layer, ctx.key, q, labels)
        qc = ctx.query.gather(-1, ch[None, :, None, :].expand(b, h, q, r))
        return torch.matmul(qc, lab.transpose(-1, -2)).float()
