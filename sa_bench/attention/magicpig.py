"""MagicPIG: LSH sampling with importance weights, through bucketed hash tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sa_bench.attention.masker import Masker
from sa_bench.attention.ops import log_weight
from sa_bench.attention.selection import Context, KeyCache, Selection
from sa_bench.config import ConfigError, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

TAIL = 64
"""Keys appended since the last table build that are compared one by one."""
REBUILD = 2048
"""Keys in the small second-level tables beyond which all tables are rebuilt as one.

Appended keys go to a small second table (rebuilt every `TAIL` steps, a sort of at most
`REBUILD` keys), the bulk stays in the first (sorted again every `REBUILD` steps, about 1.6 s
at 32k keys, 8 kv heads, L = 150 on one CPU thread)."""


def inclusion_probability(theta: Tensor, bits: int, tables: int, min_collisions: int) -> Tensor:
    """P(a key at angle theta from the query collides in >= m of L tables of K-bit SimHash):
    with P = (1 - theta / pi)^K per table, 1 - sum_{i < m} C(L, i) P^i (1 - P)^(L - i)."""
    p = (1.0 - theta / math.pi).clamp(0.0, 1.0) ** bits
    miss = torch.zeros_like(p)
    for i in range(min_collisions):
        miss = miss + math.comb(tables, i) * p**i * (1.0 - p) ** (tables - i)
    return (1.0 - miss).clamp(min=0.0)


@dataclass
class _Tables:
    """Keys [lo, n) of one layer sorted by code per (batch, kv head, table): `order` [B, n - lo]
    key ids (B = b * Hk * L rows), `starts` [B, 2^K + 1] where each code's run begins."""

    lo: int
    n: int
    order: Tensor
    starts: Tensor


@dataclass
class MagicPig(Masker):
    """MagicPIG (Chen et al., 2024, https://arxiv.org/abs/2410.16179; reference code
    https://github.com/Infini-AI-Lab/MagicPIG, evaluations/RULER/pred/cache_ref.py).

    Keys are centred (k - kbar, kbar the mean key of the context per kv head, taken at the
    first sparse call) and hashed by L tables of K-bit SimHash (random hyperplanes per kv
    head); the query is hashed by the same hyperplanes. As in the reference code, a key is
    sampled when its code equals the query's in at least `min_collisions` = 2 tables
    (1 = the plain LSH rule), with K = `lsh_bits` = 10 and L = `lsh_tables` = 150, and weighted
    by 1 / its inclusion probability (`inclusion_probability`, theta the angle between q and
    k - kbar). Tables are bucketed by code, so a step reads only the colliding keys' ids (plus
    up to `TAIL` recent keys compared directly), never all of q.K; see `REBUILD` for how they
    follow the growing cache.
    """

    key_version = 2  # results changed meaning: official >= 2 collision rule

    lsh_bits: int = 10
    lsh_tables: int = 150
    min_collisions: int = 2
    seed: int = 0
    _codes: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _norms: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _planes: dict = field(default_factory=dict, init=False, repr=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        # not a field: config checks evaluate the type hints of a masker and its fields, without torch
        self._gen: torch.Generator | None = None
        check_range(self.lsh_bits, "lsh_bits", 1, 15)
        check_range(self.lsh_tables, "lsh_tables", 1)
        check_range(self.min_collisions, "min_collisions", 1)
        if self.min_collisions > self.lsh_tables:
            raise ConfigError(f"min_collisions: {self.min_collisions} > lsh_tables {self.lsh_tables}")

    def reset(self) -> None:
        super().reset()
        self._planes.clear()
        self._tables.clear()

    def truncate(self, layer: int, n: int) -> None:
        super().truncate(layer, n)
        tables = self._tables.get(layer)
        if tables and tables[-1].n > n:
            del self._tables[layer]

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
        """x [b, Hk, n, d] -> table codes [b, Hk, n, L] (int16)."""
        bits = torch.matmul(x.float(), planes.unsqueeze(0)) >= 0
        bits = bits.view(*x.shape[:3], self.lsh_tables, self.lsh_bits).to(torch.int16)
        weights = (2 ** torch.arange(self.lsh_bits, device=x.device)).to(torch.int16)
        return (bits * weights).sum(-1, dtype=torch.int16)

    def _build(self, codes: Tensor, lo: int, n: int) -> _Tables:
        b, hk, _, L = codes.shape
        c = codes[:, :, lo:n].permute(0, 1, 3, 2).reshape(b * hk * L, n - lo)
        _, order = c.sort(dim=-1, stable=True)
        rows = torch.arange(c.shape[0], device=c.device)[:, None] * (2**self.lsh_bits)
        counts = torch.bincount((c.long() + rows).view(-1), minlength=c.shape[0] * 2**self.lsh_bits)
        starts = torch.zeros(c.shape[0], 2**self.lsh_bits + 1, dtype=torch.long, device=c.device)
        starts[:, 1:] = counts.view(c.shape[0], -1).cumsum(-1)
        return _Tables(lo, n, (order + lo).to(torch.int32), starts)

    def _layer_tables(self, layer: int, codes: Tensor, n_new: int) -> list[_Tables]:
        """The layer's tables, rebuilt where stale (keys replaced) or extended (see REBUILD)."""
        kv = codes.shape[2]
        tables = self._tables.get(layer, [])
        if tables and tables[-1].n > kv - n_new:  # keys it holds were replaced (crop, new context)
            tables = []
        if not tables:
            tables = [self._build(codes, 0, kv)]
        elif kv - tables[-1].n > TAIL:
            lo = tables[0].n
            tables = [self._build(codes, 0, kv)] if kv - lo > REBUILD else [tables[0], self._build(codes, lo, kv)]
        self._tables[layer] = tables
        return tables

    def sampled(self, ctx: Context, codes: Tensor, qc: Tensor) -> Tensor:
        """Sorted flat ids `row * kv + key` (rows over [b, Hk, g*q], i.e. [b, H, q]) of the keys
        whose code equals the query row's in at least `min_collisions` tables."""
        b, hk, kv, L = codes.shape
        R = qc.shape[2]
        tables = self._layer_tables(ctx.layer, codes, ctx.query.shape[2])
        table_row = torch.arange(b * hk * L, device=qc.device).view(b, hk, 1, L)
        q = qc.long()
        rows, keys = [], []
        for t in tables:  # bucket runs of the query's codes in rows (b, hk, table)
            start = t.starts[table_row, q]  # [b, hk, R, L]
            length = (t.starts[table_row, q + 1] - start).view(-1)
            flat = (table_row * (t.n - t.lo) + start).view(-1)
            first = torch.repeat_interleave(flat - (length.cumsum(0) - length), length)
            keys.append(t.order.view(-1)[first + torch.arange(first.shape[0], device=qc.device)].long())
            rows.append(torch.repeat_interleave(torch.arange(b * hk * R, device=qc.device),
                                                length.view(-1, L).sum(-1)))
        ids = torch.cat(rows) * kv + torch.cat(keys)  # one entry per (row, key, colliding table)
        counts = torch.zeros(b * hk * R * kv, dtype=torch.int16, device=ids.device)
        counts.scatter_add_(0, ids, torch.ones(1, dtype=torch.int16, device=ids.device).expand_as(ids))
        found = [ids[counts[ids] >= self.min_collisions]]
        n = tables[-1].n
        if n < kv:  # keys appended since the last build: compared directly
            tail = (codes[:, :, None, n:] == qc[:, :, :, None]).sum(-1) >= self.min_collisions
            row, key = tail.view(-1, kv - n).nonzero().unbind(-1)
            found.append(row * kv + n + key)
        return torch.unique(torch.cat(found))

    def select(self, ctx: Context, sel: Selection) -> Selection:
        planes, mean = self._layer_state(ctx)
        n_new = ctx.query.shape[2]
        codes = self._codes.get(ctx.layer, ctx.key, n_new, lambda k: self._hash(k.float() - mean, planes))
        knorm = self._norms.get(ctx.layer, ctx.key, n_new, lambda k: (k.float() - mean).norm(dim=-1, keepdim=True))
        qc = self._hash(ctx.grouped(ctx.query), planes)  # [b, Hk, g*q, L]
        ids = self.sampled(ctx, codes, qc)
        ids = ids[ctx.candidates(sel).reshape(-1)[ids]]
        idx, valid = _padded(ids, ctx.query.shape[:3], ctx.kv)
        # inclusion probability from the angle between q and the selected centred keys
        b, h, q, n = idx.shape
        d = ctx.key.shape[-1]
        heads = torch.arange(h, device=idx.device) // ctx.groups
        base = (torch.arange(b, device=idx.device)[:, None] * ctx.key.shape[1] + heads[None, :]) * ctx.kv
        rows = idx.clamp(max=ctx.kv - 1) + base[:, :, None, None]
        keys = ctx.key.reshape(-1, d).index_select(0, rows.view(-1)).view(b, h, q, n, d).float()
        qf = ctx.query.float()
        qmean = ctx.ungrouped(torch.matmul(ctx.grouped(qf), mean.transpose(-1, -2)))  # q . kbar, [b, H, q, 1]
        dots = torch.matmul(keys, qf.unsqueeze(-1)).squeeze(-1) - qmean
        kn = knorm.reshape(-1).index_select(0, rows.view(-1)).view(b, h, q, n)
        cos = (dots / (qf.norm(dim=-1, keepdim=True) * kn).clamp_min(1e-12)).clamp(-1.0, 1.0)
        p = inclusion_probability(torch.arccos(cos), self.lsh_bits, self.lsh_tables, self.min_collisions)
        return sel.add(idx, valid, log_weight(p), ctx.kv)


def _padded(ids: Tensor, shape: torch.Size, kv: int) -> tuple[Tensor, Tensor]:
    """Sorted flat ids row * kv + key -> (idx, valid) [*shape, max per row], keys in order."""
    rows, keys = ids // kv, ids % kv
    n_rows = math.prod(shape)
    count = torch.bincount(rows, minlength=n_rows)
    n = int(count.max()) if count.numel() else 0
    pos = torch.arange(ids.shape[0], device=ids.device) - (count.cumsum(0) - count)[rows]
    idx = torch.full((n_rows, n), kv, dtype=torch.long, device=ids.device)
    idx[rows, pos] = keys
    idx = idx.view(*shape, n)
    return idx, idx < kv
