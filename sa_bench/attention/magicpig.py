"""MagicPIG: LSH sampling with importance weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sa_bench.attention.base import (
    NEG_INF,
    Context,
    KeyCache,
    Masker,
    Selection,
    log_weight,
    top_rows,
)
from sa_bench.config import check_range


@dataclass
class MagicPig(Masker):
    """MagicPIG (Chen et al., 2024, https://arxiv.org/abs/2410.16179): LSH sampling.

    Keys are centred (k - mean key of the context, per kv head; q.(k - kbar) ranks keys as
    q.k), then hashed with L tables of K-bit SimHash (random hyperplanes). A candidate
    colliding with the query in at least one table is kept, with inclusion probability
    p(theta) = 1 - (1 - (1 - theta/pi)^K)^L, theta the angle between q and k - kbar; its
    weight is 1/p(theta). Hyperplanes are drawn per layer at the first sparse call of a
    context (new ones after `reset()`); key codes are cached across decode steps.
    """

    lsh_bits: int = 8
    lsh_tables: int = 75
    seed: int = 0
    _codes: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _planes: dict = field(default_factory=dict, init=False, repr=False)
    _gen: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.lsh_bits, "lsh_bits", 1, 62)
        check_range(self.lsh_tables, "lsh_tables", 1)

    def reset(self) -> None:
        super().reset()
        self._planes.clear()

    def _layer_state(self, ctx: Context) -> tuple[Tensor, Tensor]:
        st = self._planes.get(ctx.layer)
        if st is None:
            if self._gen is None:
                self._gen = torch.Generator().manual_seed(self.seed)
            hk, d = ctx.key.shape[1], ctx.key.shape[-1]
            planes = torch.randn(hk, d, self.lsh_tables * self.lsh_bits, generator=self._gen)
            mean = ctx.key.float().mean(2, keepdim=True)  # [b, Hk, 1, d]
            st = self._planes[ctx.layer] = (planes.to(ctx.key.device), mean)
        return st

    def _hash(self, x: Tensor, planes: Tensor) -> Tensor:
        """x [b, Hk, n, d] -> table codes [b, Hk, n, L] (int64)."""
        bits = (torch.matmul(x.float(), planes.unsqueeze(0)) >= 0).long()
        bits = bits.view(*x.shape[:3], self.lsh_tables, self.lsh_bits)
        return (bits << torch.arange(self.lsh_bits, device=x.device)).sum(-1)

    def select(self, ctx: Context, sel: Selection) -> Selection:
        planes, mean = self._layer_state(ctx)
        kc = self._codes.get(ctx.layer, ctx.key, ctx.query.shape[2],
                             lambda k: self._hash(k.float() - mean, planes))
        qc = self._hash(ctx.grouped(ctx.query), planes)  # [b, Hk, g*q, L]
        hit = torch.zeros(*qc.shape[:3], ctx.kv, dtype=torch.bool, device=qc.device)
        for t in range(self.lsh_tables):  # one table at a time keeps memory at [.., kv]
            hit |= qc[..., t, None] == kc[..., None, :, t]
        hit = ctx.ungrouped(hit) & ctx.candidates(sel)
        idx, valid = top_rows(hit.float().masked_fill(~hit, NEG_INF), hit.sum(-1))
        # inclusion probability from the angle between q and the selected centred keys
        kcent = ctx.key.float() - mean
        qn = ctx.query.float().norm(dim=-1, keepdim=True)
        kn = kcent.norm(dim=-1).repeat_interleave(ctx.groups, 1)  # [b, H, kv]
        dots = ctx.score_with(ctx.query.float(), kcent).gather(-1, idx)
        kn_sel = kn.unsqueeze(2).expand(*idx.shape[:3], -1).gather(-1, idx)
        cos = (dots / (qn * kn_sel).clamp_min(1e-12)).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        p = 1.0 - (1.0 - (1.0 - theta / math.pi) ** self.lsh_bits) ** self.lsh_tables
        return sel.add(idx, valid, log_weight(p), ctx.kv)
