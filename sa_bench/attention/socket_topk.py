"""SOCKET: top-k by soft hash collisions of the query with hard-hashed keys, times |v|."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sa_bench.attention.masker import TopKMasker
from sa_bench.attention.selection import Context, KeyCache
from sa_bench.config import Size, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

HUB_SEED = 123456789 + 7777
"""The seed of sparse-attention-hub's SOCKET planes (its `_seed` + 7777): on CPU the same
planes as the hub's."""


def corners(bits: int, device=None) -> Tensor:
    """The hypercube corners {-1, +1}^bits as columns [bits, 2^bits]: column r holds the bits
    of r, most significant first (+1 for a set bit), as the bucket codes of `hard_hash`."""
    r = torch.arange(2**bits, device=device)
    shifts = torch.arange(bits - 1, -1, -1, device=device)
    return ((r[None, :] >> shifts[:, None]) & 1).float() * 2 - 1


def hard_hash(x: Tensor, planes: Tensor) -> Tensor:
    """Bucket of each vector per table: x [..., d], planes [L, K, d] -> int16 [..., L], the K
    sign bits x.w >= 0 read as a number, most significant first."""
    bits = torch.einsum("...d,lkd->...lk", x.float(), planes) >= 0
    weights = 2 ** torch.arange(planes.shape[1] - 1, -1, -1, device=x.device)
    return (bits.long() * weights).sum(-1).to(torch.int16)


def soft_hash(x: Tensor, planes: Tensor, tau: float) -> Tensor:
    """Bucket probabilities per table: x [..., d] -> [..., L, 2^K], softmax over the corners c
    of tanh(x.w) . c / (sqrt(d) tau)."""
    h = torch.tanh(torch.einsum("...d,lkd->...lk", x.float(), planes)) / math.sqrt(x.shape[-1])
    return torch.softmax(torch.matmul(h, corners(planes.shape[1], x.device)) / tau, -1)


@dataclass
class Socket(TopKMasker):
    """SOCKET, soft collision kernel estimator (https://github.com/amarka8/SOCKET; definitions
    and defaults from sparse-attention-hub's `SocketMasker`, `socket_top_k.py` and
    `utils/socket_utils.py`, commit f5abf91).

    Keys are hard-hashed by L = `lsh_tables` tables of K = `lsh_bits` random hyperplanes (one
    bucket of 2^K per table, cached as the KV cache grows, `KeyCache`); a query is soft-hashed
    by the same planes: per table a softmax with temperature `tau` over the 2^K buckets of
    tanh(q.w) . c / sqrt(d), c the bucket's corner of {-1, +1}^K. A key scores its collision
    mass sum_l p_l(bucket_l(k)) times the norm of its value; the `heavy_size` best candidates
    are kept (`TopKMasker`, `per_kv_head` included). The planes [L, K, d] are drawn from
    `seed` on the CPU, the same for every layer and head, as the hub's; the default seed is
    the hub's, so its planes equal the hub's.

    Departure from the hub: its masker ranks every key a row may see, keys earlier maskers
    selected (sink, local) included, so part of its budget goes to them; here the budget is
    spent on the candidates, as every top-k masker here and the hub's other top-k maskers.
    Hashes and scores are computed in float32 (the hub: in the model's dtype).
    """

    heavy_size: Size = 0.1
    lsh_bits: int = 4
    lsh_tables: int = 1
    tau: float = 0.3
    seed: int = HUB_SEED
    per_kv_head: bool = False
    _codes: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _norms: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _planes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.lsh_bits, "lsh_bits", 1, 15)
        check_range(self.lsh_tables, "lsh_tables", 1)
        check_range(self.tau, "tau", 0.0, low_open=True)

    def planes(self, d: int, device) -> Tensor:
        """The hyperplanes [L, K, d] (float32) on `device`."""
        key = (d, str(device))
        if key not in self._planes:
            gen = torch.Generator().manual_seed(self.seed)
            planes = torch.randn((self.lsh_tables, self.lsh_bits, d), generator=gen)
            self._planes[key] = planes.to(device)
        return self._planes[key]

    def score(self, ctx: Context) -> Tensor:
        if ctx.value is None:
            raise ValueError("SOCKET scores keys by their values: the call has none")
        planes = self.planes(ctx.key.shape[-1], ctx.key.device)
        n_new = ctx.query.shape[2]
        codes = self._codes.get(ctx.layer, ctx.key, n_new, lambda k: hard_hash(k, planes))  # [b, Hk, kv, L]
        norms = self._norms.get(ctx.layer, ctx.value, n_new, lambda v: v.float().norm(dim=-1))  # [b, Hk, kv]
        probs = soft_hash(ctx.grouped(ctx.query), planes, self.tau)  # [b, Hk, R, L, 2^K]
        b, hk, rows = probs.shape[:3]
        mass = None
        for t in range(self.lsh_tables):
            idx = codes[..., t].long().unsqueeze(2).expand(b, hk, rows, -1)
            part = probs[..., t, :].gather(-1, idx)
            mass = part if mass is None else mass.add_(part)
        return ctx.ungrouped(mass.mul_(norms.unsqueeze(2)))


__all__ = ["Socket", "corners", "hard_hash", "soft_hash"]
