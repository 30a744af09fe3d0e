"""Reading selected rows of K and V: row views of the cache, reusable buffers, and the CPU
cost model that says when a gather beats streaming all keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sa_bench.lazy import F, torch

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class GatherCosts:
    """When gathering selected keys pays, as relative costs on CPU (1 thread) of one row of d
    values: read in a stream (a matmul over all of K or V) = 1. An element of a [H, q, kv]
    float temporary costs ~ 5 / d. `sparse_attention` picks its path by these."""

    score: float = 1.6
    """A row gathered and dotted with q one query row at a time (`Context.scores_at`, decode)."""
    score_batch: float = 6.0
    """A row gathered and dotted with q in one batch (the rows leave the cache in between)."""
    value: float = 1.5
    """A row gathered into a weighted sum (`embedding_bag`)."""
    row_loop_max: int = 256
    """Query rows (b * H * q) up to which CPU gathers go one row at a time."""

    def row_loop(self, device: torch.device, rows: int) -> bool:
        """Whether gathered scores are computed one query row at a time (CPU, few rows)."""
        return device.type == "cpu" and rows <= self.row_loop_max


CPU_GATHER = GatherCosts()
BATCHED_GATHER = GatherCosts(row_loop_max=0)
"""The batched paths a GPU takes, on CPU too (no row loops): what `perf.attention` counts as a
GPU's operator calls."""


class Workspace:
    """A reusable buffer for gathered keys: a fresh 50 MB allocation per decode step costs
    more in page faults than the gather itself on CPU. Also the constants of a device's sparse
    calls, made once and sliced per call (an `arange` of key positions, a zero, an all-true
    mask, the row offsets of `flat_rows`): at batch 1 a GPU pays a launch for each one made."""

    def __init__(self, device=None) -> None:
        self.buf: Tensor | None = None
        self.device = device
        self._arange: Tensor | None = None
        self._const: dict = {}

    def take(self, n: int, d: int, like: Tensor) -> Tensor:
        buf = self.buf
        if buf is None or buf.numel() < n * d or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buf = like.new_empty(max(n * d, 1))
        return buf[: n * d].view(n, d)

    def arange(self, n: int) -> Tensor:
        """[0, n) as int64 on the device: a view of one arange made with room for twice n (a
        decode step's one more key makes no new one: a few aranges per cell)."""
        if self._arange is None or self._arange.shape[0] < n:
            self._arange = torch.arange(max(2 * n, 1024), device=self.device)
        return self._arange[:n]

    def cached(self, key, make):
        """`make()`, made once per key (the device's constants)."""
        value = self._const.get(key)
        if value is None:
            value = self._const[key] = make()
        return value

    def zero(self) -> Tensor:
        """A float32 0 (expand it)."""
        return self.cached("zero", lambda: torch.zeros((), device=self.device))

    def true(self) -> Tensor:
        """A bool True (expand it)."""
        return self.cached("true", lambda: torch.ones((), dtype=torch.bool, device=self.device))

    def head_rows(self, b: int, h: int, groups: int) -> tuple[Tensor, Tensor]:
        """The kv head of each query head [1, H, 1, 1] and the batch index [b, 1, 1, 1]."""
        return self.cached(("rows", b, h, groups), lambda: row_indices(b, h, groups, self.device))


def key_rows(x: Tensor) -> tuple[Tensor, int, int]:
    """x [b, Hk, kv, d] as rows [N, d] of its own storage, and the row strides of b and Hk.

    No copy for a contiguous tensor or a prefix view of a bigger cache (DynamicCache.crop
    leaves one; `reshape(-1, d)` would copy the whole cache)."""
    b, hk, kv, d = x.shape
    s0, s1, s2, s3 = x.stride()
    s0 = s0 if b > 1 else 0
    if s3 == 1 and s2 == d and s0 % d == 0 and s1 % d == 0 and s0 >= 0 and s1 >= 0:
        n = (b - 1) * (s0 // d) + (hk - 1) * (s1 // d) + kv
        return x.as_strided((n, d), (d, 1)), s0 // d, s1 // d
    return x.contiguous().view(-1, d), hk * kv, kv


def row_indices(b: int, h: int, groups: int, device) -> tuple[Tensor, Tensor]:
    """The kv head of each query head [1, H, 1, 1] and the batch index [b, 1, 1, 1]."""
    heads = (torch.arange(h, device=device) // groups).view(1, h, 1, 1)
    return heads, torch.arange(b, device=device).view(b, 1, 1, 1)


def flat_rows(idx: Tensor, groups: int, r0: int, r1: int, workspace: Workspace | None = None) -> Tensor:
    """Key indices [b, H, q, n] (each < kv) -> indices into `key_rows` with row strides r0, r1
    (the head and batch indices from `workspace` when given: made once; one add at batch 1)."""
    b, h = idx.shape[:2]
    if workspace is not None and workspace.device == idx.device:
        heads, batch = workspace.head_rows(b, h, groups)
    else:
        heads, batch = row_indices(b, h, groups, idx.device)
    out = torch.add(idx, heads, alpha=r1)
    return out.add_(batch, alpha=r0) if b > 1 else out


def take_rows(rows: Tensor, idx: Tensor) -> Tensor:
    """rows[idx] for a 1-D idx: `embedding_bag` over bags of one row, ~1.3x faster than
    index_select on CPU."""
    return F.embedding_bag(idx.view(-1, 1), rows, mode="sum")
