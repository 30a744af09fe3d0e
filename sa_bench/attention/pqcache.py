"""PQCache: top-k by scores of product-quantized keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sa_bench.attention.files import model_shapes
from sa_bench.attention.masker import TopKMasker
from sa_bench.attention.ops import NEG_INF
from sa_bench.attention.selection import Context, KeyCache
from sa_bench.config import ConfigError, Size, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

CHUNK = 8192
"""Keys per distance computation (bounds the [groups, keys, centroids] temporary)."""


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (Euclidean) of each row: x [G, n, s], centroids [G, C, s]
    -> long [G, n]; |c|^2 - 2 x.c, in chunks of `CHUNK` rows."""
    norms = centroids.pow(2).sum(-1).unsqueeze(1)  # [G, 1, C]
    t = centroids.transpose(1, 2)
    return torch.cat([(norms - 2 * torch.bmm(x[:, i:i + CHUNK], t)).argmin(-1)
                      for i in range(0, x.shape[1], CHUNK)], 1)


def kmeans(x: Tensor, centroids: Tensor, iters: int) -> Tensor:
    """Lloyd's k-means from the initial `centroids` [G, C, s] on x [G, n, s] (float32): at most
    `iters` rounds of assigning each row to its nearest centroid and moving each centroid to
    the mean of its rows, stopping early at a fixed point. A centroid left without rows stays
    where it is. Returns the centroids [G, C, s]."""
    g, c, s = centroids.shape
    for _ in range(iters):
        codes = nearest(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes.unsqueeze(-1).expand(g, -1, s), x)
        counts = torch.zeros(g, c, dtype=x.dtype, device=x.device).scatter_add_(
            1, codes, torch.ones_like(codes, dtype=x.dtype))
        moved = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


@dataclass
class Codebook:
    """One layer's centroids [b, Hk, m, C, d / m] (float32), fitted on its keys
    [init_offset, fitted)."""

    centroids: Tensor
    fitted: int


@dataclass
class PQCache(TopKMasker):
    """PQCache (Zhang et al., 2025, https://arxiv.org/abs/2407.12820; definitions and defaults
    from sparse-attention-hub's `PQCache` masker, `pq_top_k.py`, commit f5abf91).

    Per layer and kv head, the head dimension d is split into m = `pq_group_factor`
    sub-vectors; per sub-space a k-means codebook of C = 2^`pq_bits` centroids is fitted
    (at most `kmeans_iter` Lloyd rounds from C distinct keys drawn with `seed`) on the keys
    [init_offset, n) present before the layer's first sparse call — the context, as the
    paper fits at prefill — and every key is coded by its nearest centroid per sub-space.
    Keys appended later (question, decoded tokens) are coded with the same codebook
    (`KeyCache`), never refitted until keys it was fitted on are replaced (a new context).
    A query scores a key by q.k approximated from the codes: sum_i q_i . c_i[code_i(k)], one
    lookup table of q_i . c per sub-space; the `heavy_size` best candidates are kept
    (`TopKMasker`, `per_kv_head` included). Keys before `init_offset` (the sink; keep them
    equal) are neither clustered nor scored.

    Departures from the hub: codebooks are fitted on the context before the first sparse
    call (the hub fits on every key present at it, question included); k-means stops at a
    fixed point (the hub: at a centroid shift^2 < 1e-4) and codes are the nearest final
    centroid (the hub keeps the last round's assignment), as the paper's PQ; an empty cluster
    keeps its centroid (the hub moves it to a random key); short rows are not made dense (the
    hub attends to every key while n <= heavy + init_offset + q + 2^pq_bits); initial
    centroids come from `seed` (the hub's from torch's global generator). Only the Euclidean
    metric (the hub's default, its docs' only one) is implemented. The paper stops k-means
    after as many rounds as fit the time of the layer's prefill; a fixed cap keeps results
    reproducible.
    """

    heavy_size: Size = 0.1
    pq_group_factor: int = 2
    pq_bits: int = 6
    kmeans_iter: int = 10
    init_offset: int = 128
    seed: int = 0
    per_kv_head: bool = False
    _codes: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _books: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.pq_group_factor, "pq_group_factor", 1)
        check_range(self.pq_bits, "pq_bits", 1, 15)
        check_range(self.kmeans_iter, "kmeans_iter", 1)
        check_range(self.init_offset, "init_offset", 0)

    def prepare(self, model_config, key: str) -> None:
        d = model_shapes(model_config)[3]
        if d % self.pq_group_factor:
            raise ConfigError(f"{key}.pq_group_factor: {self.pq_group_factor} does not divide the "
                              f"model's head dimension {d}")

    def reset(self) -> None:
        super().reset()
        self._books.clear()

    def _split(self, x: Tensor) -> Tensor:
        """[b, Hk, n, d] -> [b * Hk * m, n, d / m] float32 (one row of groups per sub-space)."""
        b, hk, n, d = x.shape
        m = self.pq_group_factor
        if d % m:
            raise ValueError(f"pq_group_factor {m} does not divide the head dimension {d}")
        return x.float().reshape(b, hk, n, m, d // m).permute(0, 1, 3, 2, 4).reshape(b * hk * m, n, d // m)

    def fit(self, keys: Tensor, layer: int) -> Tensor:
        """Centroids [b, Hk, m, C, d / m] of keys [b, Hk, n, d] (n >= 1), C = min(2^pq_bits, n)."""
        b, hk, n, _ = keys.shape
        x = self._split(keys)
        c = min(2**self.pq_bits, n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        first = torch.rand(x.shape[0], n, generator=gen).topk(c, -1).indices.to(x.device)
        init = x.gather(1, first.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return kmeans(x, init, self.kmeans_iter).view(b, hk, self.pq_group_factor, c, -1)

    def encode(self, keys: Tensor, centroids: Tensor) -> Tensor:
        """Codes [b, Hk, n, m] (int16) of keys [b, Hk, n, d]: the nearest centroid per sub-space."""
        b, hk, m, c, s = centroids.shape
        codes = nearest(self._split(keys), centroids.reshape(b * hk * m, c, s))
        return codes.view(b, hk, m, -1).transpose(2, 3).to(torch.int16)

    def _state(self, ctx: Context) -> tuple[Codebook, Tensor] | None:
        """The layer's codebook (fitted when missing or stale) and the codes of all keys."""
        kv, n_new = ctx.kv, ctx.query.shape[2]
        book = self._books.get(ctx.layer)
        if book is None or self._codes.kept(ctx.layer, ctx.key, n_new) < book.fitted:
            end = kv - n_new if kv - n_new > self.init_offset else kv
            if end <= self.init_offset:
                return None
            book = self._books[ctx.layer] = Codebook(
                self.fit(ctx.key[:, :, self.init_offset:end], ctx.layer), end)
            self._codes.truncate(ctx.layer, 0)  # codes of another codebook
        codes = self._codes.get(ctx.layer, ctx.key, n_new, lambda k: self.encode(k, book.centroids))
        return book, codes

    def score(self, ctx: Context) -> Tensor:
        state = self._state(ctx)
        b, h, q, _ = ctx.query.shape
        if state is None:  # every key is before init_offset
            return ctx.query.new_full((b, h, q, ctx.kv), NEG_INF, dtype=torch.float32)
        book, codes = state
        _, hk, m, c, s = book.centroids.shape
        qs = ctx.grouped(ctx.query).float().unflatten(-1, (m, s)).transpose(2, 3)  # [b, Hk, m, R, s]
        table = torch.matmul(qs, book.centroids.transpose(-1, -2))  # [b, Hk, m, R, C]: q_i . c
        table = table.transpose(2, 3).flatten(-2)  # [b, Hk, R, m * C]
        idx = (codes.long() + torch.arange(m, device=codes.device) * c).flatten(-2)  # [b, Hk, kv * m]
        rows = table.shape[2]
        out = table.gather(-1, idx.unsqueeze(2).expand(b, hk, rows, -1)).view(b, hk, rows, -1, m).sum(-1)
        out[..., : self.init_offset] = NEG_INF
        return ctx.ungrouped(out)


__all__ = ["Codebook", "PQCache", "kmeans", "nearest"]
