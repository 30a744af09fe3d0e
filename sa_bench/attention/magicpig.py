"""MagicPIG: LSH sampling with importance weights, through bucketed hash tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sa_bench.attention.gather import flat_rows, key_rows
from sa_bench.attention.masker import Masker
from sa_bench.attention.ops import count_true, log_weight, reads_free
from sa_bench.attention.selection import Context, Selection
from sa_bench.config import ConfigError, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

TAIL = 64
"""Keys appended since the last table build that are compared one by one."""
REBUILD = 2048
"""Keys in the small second-level tables beyond which the segment's tables are rebuilt as one.

Appended keys go to a small second table (rebuilt every `TAIL` steps, a sort of at most
`REBUILD` keys), the bulk of the current segment stays in the first (sorted again every
`REBUILD` steps)."""
SEGMENT = 65536
"""Keys per frozen table segment: a table's key ids are stored as 16-bit offsets in its
segment (2 bytes per key and table, not 8), and a full segment is never sorted again."""
HASH_BLOCK_BYTES = 64 << 20
"""Largest float32 hash product [b, Hk, keys, L*K] made at once (keys are hashed in blocks)."""

def inclusion_probability(theta: Tensor, bits: int, tables: int, min_collisions: int) -> Tensor:
    """P(a key at angle theta from the query collides in >= m of L tables of K-bit SimHash):
    with P = (1 - theta / pi)^K per table, 1 - sum_{i < m} C(L, i) P^i (1 - P)^(L - i)."""
    p = (1.0 - theta / math.pi).clamp(0.0, 1.0) ** bits
    return at_least(p, tables, min_collisions).clamp(min=0.0)


def at_least(p: Tensor, tables: int, min_collisions: int, one: Tensor | None = None) -> Tensor:
    """P(>= m of L independent events of probability p) = 1 - sum_{i < m} C(L, i) p^i q^(L - i)
    (q = 1 - p), the sum as q^(L - m + 1) sum_{i < m} C(L, i) p^i q^(m - 1 - i) by Horner's rule
    (m = 2: q^(L - 1) (q + L p)); may round below 0. `one`: a 1 of p's dtype on its device
    (a cached one: no launch to make it)."""
    L, m = tables, min_collisions
    q = 1.0 - p
    poly: Tensor | float = float(math.comb(L, m - 1))
    for i in range(m - 2, -1, -1):  # poly * p + C(L, i) q^(m - 1 - i)
        low = q if i == m - 2 else q ** (m - 1 - i)
        low = low if i == 0 else low * math.comb(L, i)  # C(L, 0) = 1
        poly = torch.add(low, p, alpha=poly) if isinstance(poly, float) else torch.addcmul(low, poly, p)
    if one is None:
        one = torch.ones((), dtype=p.dtype, device=p.device)
    head = q ** (L - m + 1)
    if isinstance(poly, float):  # m = 1
        return torch.add(one, head, alpha=-poly)
    return torch.addcmul(one, head, poly, value=-1.0)


@dataclass
class _Tables:
    """Keys [lo, n) of one layer sorted by code per (batch, kv head, table): `order` [B, n - lo]
    key ids as int16 offsets (id = lo + 32768 + order; B = b * Hk * L rows), `starts`
    [B, 2^K + 1] (int32) where each code's run begins."""

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
            mean = ctx.key.mean(2, keepdim=True, dtype=torch.float32)  # [b, Hk, 1, d], no float copy of K
            st = self._planes[ctx.layer] = (planes.to(ctx.key.device), mean)
        return st

    def _hash(self, x: Tensor, planes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """x [b, Hk, n, d] (centred, float32) -> table codes [b, Hk, n, L] (int16, or `dtype`)."""
        bits = torch.matmul(x, planes.unsqueeze(0)) >= 0
        bits = bits.view(*x.shape[:3], self.lsh_tables, self.lsh_bits)
        weights = self._constant(("powers", x.device), lambda: (
            2 ** torch.arange(self.lsh_bits, device=x.device)).to(torch.int16))
        return (bits * weights).sum(-1, dtype=dtype or torch.int16)

    def _constant(self, key, make) -> Tensor:
        """A small tensor made once per key (device, shape): no launches per call."""
        if "_constants" not in vars(self):
            self._constants: dict = {}
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = make()
        return value

    def codes(self, key: Tensor, lo: int, n: int, planes: Tensor, mean: Tensor) -> Tensor:
        """Codes [b, Hk, n - lo, L] of keys [lo, n), hashed in blocks of keys so the float32
        product stays within `HASH_BLOCK_BYTES` (not kept: tables and the tail need them once)."""
        b, hk = key.shape[:2]
        step = max(1, HASH_BLOCK_BYTES // (b * hk * planes.shape[-1] * 4))
        out = torch.empty(b, hk, n - lo, self.lsh_tables, dtype=torch.int16, device=key.device)
        for a in range(lo, n, step):
            z = min(n, a + step)
            out[:, :, a - lo:z - lo] = self._hash(key[:, :, a:z].float() - mean, planes)
        return out

    def _build(self, key: Tensor, lo: int, n: int, planes: Tensor, mean: Tensor) -> _Tables:
        """Tables of keys [lo, n) (n - lo <= SEGMENT), sorted one (batch, kv head) at a time."""
        b, hk = key.shape[:2]
        L, nb = self.lsh_tables, 2**self.lsh_bits
        order = torch.empty(b * hk * L, n - lo, dtype=torch.int16, device=key.device)
        starts = torch.zeros(b * hk * L, nb + 1, dtype=torch.int32, device=key.device)
        ones = torch.ones(1, dtype=torch.int32, device=key.device).expand(L * (n - lo))
        for i in range(b):
            for h in range(hk):
                c = self.codes(key[i:i + 1, h:h + 1], lo, n, planes[h:h + 1], mean[i:i + 1, h:h + 1])
                c = c[0, 0].t()  # [L, n - lo]
                rows = slice((i * hk + h) * L, (i * hk + h + 1) * L)
                _, o = c.sort(dim=-1, stable=True)
                order[rows] = o.sub_(32768).to(torch.int16)
                counts = torch.zeros(L * nb, dtype=torch.int32, device=key.device)
                counts.scatter_add_(0, (c.long() + torch.arange(L, device=c.device)[:, None] * nb).reshape(-1), ones)
                starts[rows, 1:] = counts.view(L, nb).cumsum(-1, dtype=torch.int32)
        return _Tables(lo, n, order, starts)

    def _layer_tables(self, layer: int, key: Tensor, n_new: int, planes: Tensor, mean: Tensor) -> list[_Tables]:
        """The layer's tables, rebuilt where stale (keys replaced) or extended: full segments of
        `SEGMENT` keys are frozen; the current segment's keys in one or two tables (REBUILD)."""
        kv = key.shape[2]
        tables = self._tables.get(layer, [])
        if tables and tables[-1].n > kv - n_new:  # keys it holds were replaced (crop, new context)
            tables = []
        if tables and kv - tables[-1].n <= TAIL:
            return tables
        full = [t for t in tables if t.n - t.lo == SEGMENT]
        rest = tables[len(full):]
        lo = full[-1].n if full else 0
        while kv - lo >= SEGMENT:
            full.append(self._build(key, lo, lo + SEGMENT, planes, mean))
            lo, rest = lo + SEGMENT, []
        if lo < kv:
            if not rest or kv - rest[0].n > REBUILD:
                rest = [self._build(key, lo, kv, planes, mean)]
            else:
                rest = [rest[0], self._build(key, rest[0].n, kv, planes, mean)]
        tables = self._tables[layer] = full + rest
        return tables

    def collisions(self, ctx: Context, qc: Tensor, planes: Tensor, mean: Tensor,
                   skip: list[tuple[int, int]] | None = None) -> tuple[Tensor, int]:
        """Tables in which each key's code equals the query row's, int16 [b, Hk, g*q, kv]: for
        the keys the tables hold, their bucket runs of the query's codes (int32 codes) are
        scattered into the counts; keys appended since the last build are compared directly
        (not when the key ranges `skip`, already selected, hold them all: their counts stay
        0). Also an upper bound of any row's keys with >= `min_collisions`, read with the
        runs' lengths (the call's one sync): each such key of a table is in that many of the
        row's runs."""
        b, hk, kv = ctx.key.shape[:3]
        L = self.lsh_tables
        R = qc.shape[2]
        tables = self._layer_tables(ctx.layer, ctx.key, ctx.query.shape[2], planes, mean)
        table_row = self._constant(("table_row", qc.device, b, hk, L), lambda: torch.arange(
            b * hk * L, device=qc.device).view(b, hk, 1, L))
        runs = []
        for t in tables:  # bucket runs [start, end) of the query's codes in rows (b, hk, table)
            bounds = t.starts.unfold(1, 2, 1)[table_row, qc]  # [b, hk, R, L, 2] (a view indexed)
            length = bounds[..., 1] - bounds[..., 0]
            runs.append((t, bounds[..., 1], length, length.sum(-1)))
        # every row's run length per table, read at once: the gathers' sizes and the bound
        lengths = torch.stack([r[3].view(-1) for r in runs]) if len(runs) > 1 else runs[0][3].view(1, -1)
        per_row = lengths.tolist()
        n = tables[-1].n
        tail = n < kv and not (skip and any(a <= n and z >= kv for a, z in skip))
        most = max(sum(col) for col in zip(*per_row, strict=True))
        bound = min(kv, most // self.min_collisions + (kv - n if tail else 0))
        counts = torch.zeros(b * hk * R * kv, dtype=torch.int16, device=qc.device)
        one = self._constant(("one", qc.device), lambda: torch.ones(1, dtype=torch.int16, device=qc.device))
        positions = ctx.workspace.arange if ctx.workspace is not None else (
            lambda size: torch.arange(size, device=qc.device))
        for (t, end, length, row_len), rows in zip(runs, per_row, strict=True):
            total = sum(rows)
            length = length.view(-1)
            # each entry's position in the table's sorted keys: its run's start + its rank in the run
            last = torch.add(end, table_row, alpha=t.n - t.lo).view(-1)  # run ends, flat
            first = torch.repeat_interleave(last - length.cumsum(0), length, output_size=total)
            got = t.order.view(-1)[first + positions(total)]
            row_ids = torch.arange(t.lo + 32768, t.lo + 32768 + b * hk * R * kv, kv, device=qc.device)
            ids = torch.repeat_interleave(row_ids, row_len.view(-1), output_size=total) + got
            counts.scatter_add_(0, ids, one.expand_as(ids))  # one per (row, key, colliding table)
        counts = counts.view(b, hk, R, kv)
        if tail:  # keys appended since the last build: compared directly
            codes = self.codes(ctx.key, n, kv, planes, mean)
            counts[..., n:] = (codes[:, :, None] == qc[:, :, :, None]).sum(-1)
        return counts, bound

    def select(self, ctx: Context, sel: Selection) -> Selection:
        planes, mean = self._layer_state(ctx)
        qc = self._hash(ctx.grouped(ctx.query).float(), planes, torch.int32)  # [b, Hk, g*q, L]
        spans = sel.spans if ctx.all_allowed else None  # candidates: every key less these ranges
        counts, bound = self.collisions(ctx, qc, planes, mean, spans)
        counts = ctx.ungrouped(counts)  # [b, H, q, kv]
        if spans is None:
            counts = counts.masked_fill_(~ctx.candidates(sel), 0)
        else:
            for a, z in spans:
                counts[..., a:z] = 0
        h, hk = counts.shape[1], ctx.key.shape[1]
        if reads_free(counts.device) or bound * h > ctx.kv * hk:
            # the widest row's keys, read: free on CPU; on an accelerator a second sync, taken
            # when lists of `bound` keys per head would gather more rows than all the keys
            bound = int(count_true(counts >= self.min_collisions).max())
        # the keys with the most collisions: every one with enough (at most `bound` per row)
        top, idx = counts.topk(bound, -1, sorted=False)
        valid = top >= self.min_collisions
        # inclusion probability from the angle between q and the selected centred keys
        b, _, q, n = idx.shape
        d = ctx.key.shape[-1]
        rows, r0, r1 = key_rows(ctx.key)  # no copy of a prefix view of the cache
        flat = flat_rows(idx, ctx.groups, r0, r1, ctx.workspace)
        keys = rows.index_select(0, flat.view(-1)).view(b, hk, ctx.groups, q, n, d)
        # mean - k (float32): its angle with q is pi - theta
        away = torch.sub(mean.view(b, hk, 1, 1, 1, d), keys).view(b, h, q, n, d)
        qf = ctx.query.float()
        dots = torch.matmul(away, qf.unsqueeze(-1)).squeeze(-1)
        kn = away.norm(dim=-1)
        cos = (dots / (qf.norm(dim=-1, keepdim=True) * kn).clamp_min(1e-12)).clamp(-1.0, 1.0)
        # per table (1 - theta / pi)^K = ((pi - theta) / pi)^K
        p = (torch.arccos(cos) / math.pi) ** self.lsh_bits
        one = self._constant(("1.0", p.device), lambda: torch.ones((), device=p.device))
        p = at_least(p, self.lsh_tables, self.min_collisions, one)
        return sel.add(idx, valid, log_weight(p), ctx.kv)



