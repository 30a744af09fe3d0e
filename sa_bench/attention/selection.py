"""What maskers read and write: the selection of keys, the attention call, key caches.

A masker looks at one attention call (queries, keys, mask) and *adds* keys to the set each
query attends to. The set is kept as an index list per query row, never as a dense mask:

    Selection.idx  [b, H, q, n]  key indices (padding entries hold the sentinel kv)
    Selection.logw [b, H, q, n]  log of the key's weight: 0 for a deterministic key,
                                 -log(pi) for a key sampled with inclusion probability pi,
                                 -inf for padding

The sparse output is  o = sum_j w_j exp(s_j) v_j / sum_j w_j exp(s_j)  over the selected j,
with s_j = q.k_j * scaling and w_j = exp(logw_j): the Horvitz-Thompson estimate of the
dense numerator and denominator when keys are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sa_bench.attention.gather import (
    CPU_GATHER,
    GatherCosts,
    Workspace,
    flat_rows,
    key_rows,
    take_rows,
)
from sa_bench.attention.ops import NEG_INF, compact, count_true, float_matmul, reads_free
from sa_bench.config import Size
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Selection:
    """Keys chosen so far for every query row (see module docstring)."""

    idx: Tensor
    logw: Tensor
    shared: bool = True
    """The query heads of each kv head hold the same entries (every masker so far added keys
    with `shared=True`); `sparse_attention` then reads each kv head's selected keys once."""
    dense: Tensor | None = None
    """More keys (weight 1), as a bool [b, H, q, kv] mask disjoint from the entries: a large
    selection (oracle top-p on flat attention) without index lists. Maskers never see it (they
    get `indexed()`); `sparse_attention` uses it as a bias when that is cheaper."""
    exact: bool = False
    """Known without reading it: every entry is a distinct key < kv with weight 1 (no padding,
    logw 0): each row holds `idx.shape[-1]` keys; kernels skip the weights and padding."""
    spans: list[tuple[int, int]] | None = None
    """The entries are exactly these sorted disjoint key ranges (`of_spans`): whether a key is
    selected is a comparison with their bounds (`unselected`), no search."""
    some_valid: bool = False
    """Every row holds a valid entry, known without reading it (a softmax over the entries
    has no empty row)."""

    @classmethod
    def empty(cls, b: int, h: int, q: int, device) -> Selection:
        return cls(torch.empty(b, h, q, 0, dtype=torch.long, device=device),
                   torch.empty(b, h, q, 0, dtype=torch.float32, device=device))

    @classmethod
    def of_spans(cls, spans: list[tuple[int, int]], b: int, h: int, q: int, device) -> Selection:
        """Every key of the ranges `spans` (disjoint) for every row: the selection of the range
        maskers `decode_spans` covers."""
        if not spans:
            return cls.empty(b, h, q, device)
        idx = torch.cat([torch.arange(start, stop, device=device) for start, stop in spans])
        shape = (b, h, q, idx.shape[0])
        return cls(idx.expand(shape), torch.zeros((), device=device).expand(shape), exact=True,
                   spans=list(spans), some_valid=True)

    @classmethod
    def of_range_spans(cls, spans: list[tuple[int, int]], b: int, h: int, q: int,
                       workspace: Workspace) -> Selection:
        """`of_spans` from the workspace's cached arange and zero (one cat, or none)."""
        if not spans:
            return cls.empty(b, h, q, workspace.device)
        ar = workspace.arange(spans[-1][1])
        parts = [ar[start:stop] for start, stop in spans]
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        shape = (b, h, q, idx.shape[0])
        return cls(idx.expand(shape), workspace.zero().expand(shape), exact=True,
                   spans=list(spans), some_valid=True)

    @property
    def valid(self) -> Tensor:
        return self.logw > NEG_INF

    def add(self, idx: Tensor, valid: Tensor | None, logw: Tensor | float, kv: int,
            shared: bool = False) -> Selection:
        """Append `idx` (broadcast to [b, H, q, m]); invalid entries become padding. `shared`:
        the added entries are equal for the query heads of a kv head. `valid` None: every
        entry is valid (a key < kv not selected before), known without reading them."""
        shape = (*self.idx.shape[:3], idx.shape[-1])
        if valid is None:
            zero = isinstance(logw, float) and logw == 0.0
            out = torch.cat([self.idx, idx.expand(shape)], -1)
            if zero and self.exact and self.idx.shape[-1] and not any(self.logw.stride()):
                # one zero expanded (`of_range_spans`): the same zero for every entry, no tensor
                logw = self.logw.as_strided(out.shape, (0,) * out.dim())
            else:
                logw = torch.cat([self.logw, torch.as_tensor(logw, dtype=torch.float32,
                                                             device=idx.device).expand(shape)], -1)
            return Selection(out, logw, self.shared and shared, exact=self.exact and zero,
                             some_valid=self.some_valid or (idx.shape[-1] > 0))
        valid = valid.expand(shape)
        idx = torch.where(valid, idx, kv)
        if isinstance(logw, float):  # one kernel, the numbers as its arguments
            logw = torch.where(valid, logw, NEG_INF)
        else:
            logw = torch.where(valid, logw.to(torch.float32).expand(shape), NEG_INF)
        return Selection(torch.cat([self.idx, idx], -1), torch.cat([self.logw, logw], -1),
                         self.shared and shared, some_valid=self.some_valid)

    @property
    def known_count(self) -> int | None:
        """Keys selected per row when known without reading them (`exact`), else None."""
        return self.idx.shape[-1] if self.exact and self.dense is None else None

    def count(self) -> Tensor:
        """Keys selected per row, [b, H, q] (computed once)."""
        if not hasattr(self, "_count"):
            n = count_true(self.valid)
            self._count = n if self.dense is None else n + count_true(self.dense)
        return self._count

    def indexed(self) -> Selection:
        """The same keys as index lists only (the dense part compacted)."""
        if self.dense is None:
            return self
        idx, valid = compact(self.dense, self.dense.shape[-1])
        return Selection(self.idx, self.logw, self.shared).add(idx, valid, 0.0, self.dense.shape[-1])

    def of_kv_heads(self, groups: int) -> Selection:
        """The entries of the first query head of each kv head, [b, Hk, q, n]: a shared
        selection's entries for each kv head."""
        return Selection(self.idx[:, ::groups], self.logw[:, ::groups], self.shared,
                         exact=self.exact)

    def unselected(self, idx: Tensor, kv: int) -> Tensor:
        """Whether each candidate in `idx` [b, 1|H, q, m] (any index >= 0) is a key < kv not
        selected yet -> bool [b, H, q, m]. A selection of spans compares with the bounds of
        the gaps between them (one gap, sink and local: two comparisons)."""
        shape = (*self.idx.shape[:3], idx.shape[-1])
        if self.spans is None:
            ok = idx < kv
            return ok & ~self.contains(idx.clamp(max=kv - 1), kv) if self.idx.shape[-1] else ok.expand(shape)
        gaps, at = [], 0
        for start, stop in [*self.spans, (kv, kv)]:
            if start > at:
                gaps.append((at, min(start, kv)))
            at = max(at, stop)
        out = None
        for start, stop in gaps:
            part = idx < stop if start == 0 else (idx >= start) & (idx < stop)
            out = part if out is None else out | part
        return torch.zeros(shape, dtype=torch.bool, device=idx.device) if out is None else out.expand(shape)

    def contains(self, idx: Tensor, kv: int | None = None) -> Tensor:
        """Whether each candidate in `idx` [b, 1|H, q, m] is already selected -> [b, H, q, m].

        With `kv` (every index <= kv) and a selection of more than kv / 16 keys: a
        [b, H, q, kv + 1] bitmap, O(kv + n + m) per row (bool, an eighth of a row of scores);
        else a sorted search, O((n + m) log n)."""
        shape = (*self.idx.shape[:3], idx.shape[-1])
        if self.idx.shape[-1] == 0:
            return torch.zeros(shape, dtype=torch.bool, device=idx.device)
        idx = idx.expand(shape)
        if kv is not None and self.idx.shape[-1] * 16 > kv:
            taken = torch.zeros(*shape[:3], kv + 1, dtype=torch.bool, device=idx.device)
            return taken.scatter_(-1, self.idx, True).gather(-1, idx)
        ref = self.idx.sort(-1).values  # padding (the sentinel kv) sorts last, never a candidate
        idx = idx.contiguous()
        pos = torch.searchsorted(ref, idx).clamp_(max=ref.shape[-1] - 1)
        return ref.gather(-1, pos) == idx


class KeyCache:
    """Per-layer features of the keys (e.g. hash signatures), grown as the KV cache grows.

    Each call passes the keys after the cache update; its last `n_new` keys are the ones just
    appended, so features of keys before `kv - n_new` are reused and the rest recomputed. This
    tolerates `DynamicCache.crop` (the key count shrinking, then growing with new keys).
    Storage is a buffer with spare capacity, so a decode step does not copy the whole cache:
    appends are amortized (a full buffer grows by half its length plus 256 rows), not pre-sized
    to the cell as the KV cache is (`kv_cache`): a masker sees the keys only, not the cell.
    """

    def __init__(self) -> None:
        self.buf: dict[int, Tensor] = {}
        self.length: dict[int, int] = {}

    def clear(self) -> None:
        self.buf.clear()
        self.length.clear()

    def truncate(self, layer: int, n: int) -> None:
        if layer in self.length:
            self.length[layer] = max(0, min(self.length[layer], n))

    def get(self, layer: int, key: Tensor, n_new: int, fn) -> Tensor:
        """Features [b, Hk, kv, f] of all keys; `fn(key_slice)` computes them for new keys."""
        kv = key.shape[-2]
        keep = self.kept(layer, key, n_new)
        if keep < kv:
            self.write(layer, keep, fn(key[:, :, keep:]))
        self.length[layer] = kv
        return self.buf[layer][:, :, :kv]

    def kept(self, layer: int, key: Tensor, n_new: int) -> int:
        """How many of the keys' cached features are still valid (the last `n_new` never are)."""
        buf = self.buf.get(layer)
        if buf is None or buf.shape[0] != key.shape[0] or buf.device != key.device:
            return 0
        return max(0, min(self.length.get(layer, 0), key.shape[-2] - n_new))

    def write(self, layer: int, at: int, new: Tensor) -> None:
        """Store rows `new` [b, Hk, n, ...] at row `at` (rows before `at` kept)."""
        self.rows(layer, at, new.shape[2], new).copy_(new)

    def rows(self, layer: int, at: int, n: int, like: Tensor) -> Tensor:
        """Rows [at, at + n) of the layer's buffer to write in place (rows before `at` kept;
        an operator's `out=`, no copy), for features shaped as `like` [b, Hk, any, ...] in its
        dtype and device: the buffer is remade when they differ and grown with spare capacity
        when it is too small. Rows past the length set last are free for scratch use."""
        end = at + n
        buf = self.buf.get(layer)
        if (buf is None or buf.shape[2] < end or buf.dtype != like.dtype or buf.device != like.device
                or buf.shape[:2] != like.shape[:2] or buf.shape[3:] != like.shape[3:]):
            grown = like.new_empty(*like.shape[:2], end + end // 2 + 256, *like.shape[3:])
            if at:  # kept() said the rows before `at` are valid: same batch, dtype, device
                grown[:, :, :at] = buf[:, :, :at]
            buf = self.buf[layer] = grown
        return buf[:, :, at:end]


@dataclass
class Context:
    """One attention call as the maskers see it.

    query [b, H, q, d] (RoPE applied), key [b, Hk, kv, d] (cache included), `allowed`
    [b, 1, q, kv] bool from the model's mask (causal, padding, sliding window). Query row i
    sits at key position kv - q + i. Query head h reads kv head h // (H / Hk).
    """

    query: Tensor
    key: Tensor
    scaling: float
    layer: int
    allowed: Tensor
    generator: torch.Generator | None = None
    full_scores: Tensor | None = None
    """Exact scores of all keys (`scores()`); a key a row may not see may hold -inf."""
    costs: GatherCosts = CPU_GATHER
    """When gathers pay and when CPU gathers loop over query rows (`GatherCosts`)."""
    value: Tensor | None = None
    """The values [b, Hk, kv, d] of the keys (cache included), for maskers that score by them."""
    sinks: Tensor | None = None
    """Learned sink logits per query head [H] (GPT-OSS): one more softmax column that attends
    to nothing, whatever keys are selected (`sparse_attention`); maskers do not see it."""
    causal: bool = False
    """`allowed` is plain causality (the call had no mask): what a row sees is known without
    reading it."""
    workspace: Workspace | None = None
    """The device's buffers and constants (`Workspace`), when the call has them."""

    @property
    def uniform_keys(self) -> int | None:
        """The keys every row may see when that is one number known without reading the mask
        (one query row, no mask: decode), else None."""
        return self.kv if self.causal and self.query.shape[2] == 1 else None

    def sink_rows(self) -> Tensor | None:
        """`sinks` as float32 [1, H, 1, 1] (broadcasts over rows of scores), or None."""
        return None if self.sinks is None else self.sinks.float().reshape(1, -1, 1, 1)

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def kv(self) -> int:
        return self.key.shape[-2]

    @property
    def n_keys(self) -> Tensor:
        """Keys each query row may see, [b, 1, q] (long)."""
        if not hasattr(self, "_n_keys"):
            n = self.uniform_keys
            self._n_keys = (count_true(self.allowed) if n is None else
                            torch.full((self.query.shape[0], 1, 1), n, device=self.key.device))
        return self._n_keys

    def budget(self, size: Size) -> Tensor:
        """Keys per row [b, 1, q]: an int is a count, a float a fraction of the row's keys."""
        n = self.n_keys
        if isinstance(size, float):
            return torch.round(n.double() * size).long()
        return n.clamp(max=int(size))

    def row_budget(self, size: Size) -> Tensor | int:
        """`budget(size)`, as an int when every row has the same (`uniform_keys`): no tensor."""
        n = self.uniform_keys
        return self.budget(size) if n is None else size_of(size, n)

    def budget_max(self, size: Size) -> int:
        """An upper bound of `budget(size)` known without reading the mask (no device sync)."""
        return size_of(size, self.kv)

    @property
    def positions(self) -> Tensor:
        """Key position of each query row, [q] (row i sits at kv - q + i)."""
        q = self.query.shape[2]
        if self.workspace is not None:
            return self.workspace.arange(self.kv)[self.kv - q:]
        return torch.arange(self.kv - q, self.kv, device=self.key.device)

    def grouped(self, x: Tensor) -> Tensor:
        """[b, H, q, f] -> [b, Hk, g*q, f] so one matmul per kv head serves its query heads."""
        b, h, q, f = x.shape
        return x.reshape(b, self.key.shape[1], self.groups * q, f)

    def group_max(self, x: Tensor) -> Tensor:
        """[b, H, q, n] -> [b, Hk, q, n]: the maximum over each kv head's query heads (a new
        tensor)."""
        return x.unflatten(1, (self.key.shape[1], self.groups)).amax(2)

    def ungrouped(self, x: Tensor) -> Tensor:
        """[b, Hk, g*q, n] -> [b, H, q, n]."""
        return x.reshape(x.shape[0], self.query.shape[1], self.query.shape[2], x.shape[-1])

    def score_with(self, qf: Tensor, kf: Tensor) -> Tensor:
        """qf [b, H, q, f] . kf [b, Hk, kv, f] -> float32 [b, H, q, kv] (GQA without repeating
        keys; float32 scores from half-precision inputs, see `float_matmul`)."""
        # keys as the left operand: about 2x faster on CPU than q @ k^T for few query rows;
        # on an accelerator q @ k^T, whose output needs no copy to become [b, H, q, kv]
        if kf.dtype != qf.dtype:
            qf = qf.to(kf.dtype)
        if not reads_free(kf.device):
            return self.ungrouped(float_matmul(self.grouped(qf), kf.transpose(-1, -2)))
        return self.ungrouped(float_matmul(kf, self.grouped(qf).transpose(-1, -2)).transpose(-1, -2))

    def scores(self) -> Tensor:
        """Exact scores q.k * scaling, [b, H, q, kv] float32 (computed once per call)."""
        if self.full_scores is None:
            self.full_scores = self.score_with(self.query, self.key).mul_(self.scaling)
        return self.full_scores

    def scores_at(self, idx: Tensor, workspace: Workspace | None = None, clamped: bool = False) -> Tensor:
        """Exact scores of the keys `idx` [b, H, q, n] (any index < kv), float32: taken from
        `full_scores` when a masker computed them, else from the gathered keys only.

        On CPU with few query rows (decode), one row at a time: its keys are gathered
        (`take_rows`) into a buffer that stays in cache
        for the product with q, ~1.6x the cost of streaming the keys (a batched gather and bmm
        is ~6x, the gathered rows leave the cache between the two)."""
        if not clamped:
            idx = idx.clamp(max=self.kv - 1)
        if self.full_scores is not None:
            return self.full_scores.gather(-1, idx)
        b, h, q, n = idx.shape
        d = self.key.shape[-1]
        rows, r0, r1 = key_rows(self.key)
        flat = self.flat_rows(idx, r0, r1).reshape(b * h * q, n)
        query = self.query.reshape(b * h * q, d).to(self.key.dtype)
        if self.costs.row_loop(self.key.device, b * h * q):
            out = torch.empty(b * h * q, n, dtype=torch.float32)
            exact = self.key.dtype == torch.float32
            query = query if exact else query.float()
            for r in range(b * h * q):
                k = take_rows(rows, flat[r])
                torch.mv(k if exact else k.float(), query[r], out=out[r])
        else:
            keys = (workspace or Workspace()).take(flat.numel(), d, self.key)
            torch.index_select(rows, 0, flat.reshape(-1), out=keys)
            out = float_matmul(query.unsqueeze(1), keys.view(b * h * q, n, d).transpose(1, 2))
        return out.view(b, h, q, n).mul_(self.scaling)

    def flat_rows(self, idx: Tensor, r0: int, r1: int) -> Tensor:
        """`flat_rows(idx, groups, r0, r1)`, made once for the call's last `idx` and strides
        (the keys and values of a cache share them: one add for both gathers)."""
        memo = getattr(self, "_flat", None)
        if memo is not None and memo[0] is idx and memo[1] == (r0, r1):
            return memo[2]
        out = flat_rows(idx, self.groups, r0, r1, self.workspace)
        self._flat = (idx, (r0, r1), out)
        return out

    def candidates(self, sel: Selection) -> Tensor:
        """Bool [b, H, q, kv]: keys a row may see that are not selected yet."""
        b, h, q, _ = sel.idx.shape
        taken = torch.zeros(b, h, q, self.kv + 1, dtype=torch.bool, device=self.key.device)
        taken.scatter_(-1, sel.idx, True)
        return self.allowed & ~taken[..., : self.kv]

    @property
    def all_allowed(self) -> bool:
        """Every row may see every key (decode without padding); known on CPU only (reading
        it elsewhere would sync), else False."""
        if not hasattr(self, "_all_allowed"):
            self._all_allowed = self.uniform_keys is not None or (
                reads_free(self.key.device) and bool(self.allowed.all()))
        return self._all_allowed

    def without(self, scores: Tensor, sel: Selection, inplace: bool = False) -> Tensor:
        """`scores` [b, H, q, kv] with -inf where a key is not a candidate (masked out or
        already selected); no [b, H, q, kv] mask is built."""
        if not inplace:
            scores = scores.clone()
        if not self.all_allowed:
            scores.masked_fill_(~self.allowed, NEG_INF)
        if sel.exact and sel.idx.shape[-1]:  # no padding: -inf on every entry
            scores.scatter_(-1, sel.idx, NEG_INF)
        elif sel.idx.shape[-1]:  # padding entries (index kv) leave the last key as it is
            fill = torch.where(sel.valid, NEG_INF, float("inf")).to(scores.dtype)
            scores.scatter_reduce_(-1, sel.idx.clamp(max=self.kv - 1), fill, reduce="amin")
        return scores

    def rand(self, shape, dtype: torch.dtype | None = None) -> Tensor:
        """Uniform [0, 1) numbers from the call's generator, float32 unless `dtype`."""
        return torch.rand(shape, generator=self.generator, device=self.key.device,
                          dtype=dtype or torch.float32)


def size_of(size: Size, n: int) -> int:
    """`Context.budget` of one row that may see `n` keys (no tensors)."""
    return round(n * size) if isinstance(size, float) else min(int(size), n)
