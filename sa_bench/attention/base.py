"""Shared machinery of the maskers: selections, budgets, key caches and the attention kernels.

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

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sa_bench.config import ConfigError, Size
from sa_bench.lazy import F, torch

if TYPE_CHECKING:
    from torch import Tensor

NEG_INF = float("-inf")


class Masker:
    """Base of all maskers: a dataclass of YAML keys plus `select`.

    Subclasses implement `select(ctx, sel) -> Selection`, returning `sel` with keys added.
    `reset()` drops per-context state, `truncate(layer, n)` per-layer key caches beyond key
    `n`, `prepare(model_config, key)` loads/validates files against the model, `notes()`
    describes fallbacks for the results, `decode_range(kv)` the one range of keys it selects
    in decode when that is known without tensors (sink, local: read as slices of the cache).
    """

    def select(self, ctx: Context, sel: Selection) -> Selection:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:
        for value in vars(self).values():
            if isinstance(value, KeyCache):
                value.clear()

    def truncate(self, layer: int, n: int) -> None:
        for value in vars(self).values():
            if isinstance(value, KeyCache):
                value.truncate(layer, n)

    def prepare(self, model_config, key: str) -> None:
        """Check files against the model (called by install); raise ConfigError naming `key`."""

    def notes(self) -> list[str]:
        return []

    def decode_range(self, kv: int) -> tuple[int, int] | None:
        """The keys [start, stop) this masker selects for one query row that may see all `kv`
        keys, when that is one range known without looking at them (sink, local); else None."""
        return None

    @property
    def group_shared(self) -> bool:
        """Whether the keys this masker adds are the same for the query heads of a kv head
        (given a shared selection before it): `per_kv_head: true` maskers, sink and local."""
        return bool(getattr(self, "per_kv_head", False))


def model_shapes(model_config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a transformers config."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, kv_heads, head_dim


def model_file(pretrained: str, name: str) -> Path | None:
    """A method's file shipped next to a model (`embedded:<name>` or a local directory), or None.

    Used by maskers whose `auto` setting means "the file fitted for this model" (hashattn
    weights, double-sparsity calibration); a hub id has no directory of its own here.
    """
    from sa_bench.models.loading import EMBEDDED_PREFIX, embedded_dir, is_local_path

    if pretrained.startswith(EMBEDDED_PREFIX):
        folder = embedded_dir(pretrained[len(EMBEDDED_PREFIX):])
    elif is_local_path(pretrained):
        folder = Path(pretrained).expanduser()
    else:
        return None
    path = folder / name
    return path if path.is_file() else None


def method_file(value: str, model: str | None, name: str, key: str, what: str,
                missing: str) -> Path:
    """The file a masker reads: `value` itself, or for `auto` the file `name` next to `model`.

    Raises ConfigError naming `key`: a given file that does not exist (`what` names its kind),
    `auto` without a model, or `missing` when the model has no such file.
    """
    if value != "auto":
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: {what} file not found: {value}")
        return path
    if model is None:
        raise ConfigError(f"{key}: 'auto' looks up the model's {what} file, but `model` is not "
                          "set (the method config sets model: ${model.pretrained}); or give a file")
    path = model_file(model, name)
    if path is None:
        raise ConfigError(f"{key}: {missing}")
    return path


def check_fraction(value: float, name: str, low_open: bool = True) -> None:
    """Raise ConfigError('name: ...') unless value is in (0, 1] (or [0, 1] with low_open=False)."""
    if (value <= 0.0 if low_open else value < 0.0) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{name}: expected a value in {interval}, got {value}")


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
        return cls(idx.expand(shape), torch.zeros((), device=device).expand(shape))

    @property
    def valid(self) -> Tensor:
        return self.logw > NEG_INF

    def add(self, idx: Tensor, valid: Tensor, logw: Tensor | float, kv: int,
            shared: bool = False) -> Selection:
        """Append `idx` (broadcast to [b, H, q, m]); invalid entries become padding. `shared`:
        the added entries are equal for the query heads of a kv head."""
        shape = (*self.idx.shape[:3], idx.shape[-1])
        idx, valid = idx.expand(shape), valid.expand(shape)
        logw = torch.as_tensor(logw, dtype=torch.float32, device=idx.device).expand(shape)
        idx = torch.where(valid, idx, kv)
        logw = torch.where(valid, logw, NEG_INF)
        return Selection(torch.cat([self.idx, idx], -1), torch.cat([self.logw, logw], -1),
                         self.shared and shared)

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
        return Selection(self.idx[:, ::groups], self.logw[:, ::groups], self.shared)

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
    Storage is a buffer with spare capacity, so a decode step does not copy the whole cache.
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
        """Store rows `new` [b, Hk, n, ...] at row `at` (rows before `at` kept), growing the
        buffer with spare capacity when it is too small."""
        end = at + new.shape[2]
        buf = self.buf.get(layer)
        if (buf is None or buf.shape[2] < end or buf.dtype != new.dtype
                or buf.shape[0] != new.shape[0] or buf.device != new.device):
            grown = new.new_empty(*new.shape[:2], end + end // 2 + 256, *new.shape[3:])
            if at:  # kept() said the rows before `at` are valid: same batch, dtype, device
                grown[:, :, :at] = buf[:, :, :at]
            buf = self.buf[layer] = grown
        buf[:, :, at:end] = new


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
            self._n_keys = count_true(self.allowed)
        return self._n_keys

    def budget(self, size: Size) -> Tensor:
        """Keys per row [b, 1, q]: an int is a count, a float a fraction of the row's keys."""
        n = self.n_keys
        if isinstance(size, float):
            return torch.round(n.double() * size).long()
        return n.clamp(max=int(size))

    def budget_max(self, size: Size) -> int:
        """An upper bound of `budget(size)` known without reading the mask (no device sync)."""
        return size_of(size, self.kv)

    @property
    def positions(self) -> Tensor:
        """Key position of each query row, [q] (row i sits at kv - q + i)."""
        q = self.query.shape[2]
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
        """qf [b, H, q, f] . kf [b, Hk, kv, f] -> [b, H, q, kv] (GQA without repeating keys)."""
        # keys as the left operand: about 2x faster on CPU than q @ k^T for few query rows
        return self.ungrouped(torch.matmul(kf, self.grouped(qf).transpose(-1, -2)).transpose(-1, -2))

    def scores(self) -> Tensor:
        """Exact scores q.k * scaling, [b, H, q, kv] float32 (computed once per call)."""
        if self.full_scores is None:
            self.full_scores = self.score_with(self.query * self.scaling, self.key).float()
        return self.full_scores

    def scores_at(self, idx: Tensor, workspace: Workspace | None = None) -> Tensor:
        """Exact scores of the keys `idx` [b, H, q, n] (any index < kv), float32: taken from
        `full_scores` when a masker computed them, else from the gathered keys only.

        On CPU with few query rows (decode), one row at a time: its keys are gathered
        (`take_rows`) into a buffer that stays in cache
        for the product with q, ~1.6x the cost of streaming the keys (a batched gather and bmm
        is ~6x, the gathered rows leave the cache between the two)."""
        idx = idx.clamp(max=self.kv - 1)
        if self.full_scores is not None:
            return self.full_scores.gather(-1, idx)
        b, h, q, n = idx.shape
        d = self.key.shape[-1]
        rows, r0, r1 = key_rows(self.key)
        flat = _flat_rows(idx, self.groups, r0, r1).reshape(b * h * q, n)
        query = self.query.reshape(b * h * q, d).to(self.key.dtype)
        if row_loop(self.key.device, b * h * q):
            out = torch.empty(b * h * q, n, dtype=self.key.dtype)
            for r in range(b * h * q):
                torch.mv(take_rows(rows, flat[r]), query[r], out=out[r])
        else:
            keys = (workspace or Workspace()).take(flat.numel(), d, self.key)
            torch.index_select(rows, 0, flat.reshape(-1), out=keys)
            out = torch.matmul(query.unsqueeze(1), keys.view(b * h * q, n, d).transpose(1, 2))
        return out.view(b, h, q, n).float() * self.scaling

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
            self._all_allowed = self.key.device.type == "cpu" and bool(self.allowed.all())
        return self._all_allowed

    def without(self, scores: Tensor, sel: Selection, inplace: bool = False) -> Tensor:
        """`scores` [b, H, q, kv] with -inf where a key is not a candidate (masked out or
        already selected); no [b, H, q, kv] mask is built."""
        if not inplace:
            scores = scores.clone()
        if not self.all_allowed:
            scores.masked_fill_(~self.allowed, NEG_INF)
        if sel.idx.shape[-1]:  # padding entries (index kv) leave the last key as it is
            fill = torch.where(sel.valid, NEG_INF, float("inf")).to(scores.dtype)
            scores.scatter_reduce_(-1, sel.idx.clamp(max=self.kv - 1), fill, reduce="amin")
        return scores

    def rand(self, shape, dtype: torch.dtype | None = None) -> Tensor:
        """Uniform [0, 1) numbers from the call's generator, float32 unless `dtype`."""
        return torch.rand(shape, generator=self.generator, device=self.key.device,
                          dtype=dtype or torch.float32)


class TopKMasker(Masker):
    """Shared top-k step: the `heavy_size` candidates with the highest `score`, per query head
    (as the papers), or with `per_kv_head` one set per kv head chosen by the highest score
    among its query heads (every query head of the group attends to it; a GQA variant that
    reads each selected key once per kv head)."""

    heavy_size: Size
    per_kv_head: bool

    def score(self, ctx: Context) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def group_score(self, ctx: Context) -> Tensor:
        """[b, Hk, q, kv]: the highest `score` among each kv head's query heads (a new tensor)."""
        return ctx.group_max(self.score(ctx))

    def select(self, ctx: Context, sel: Selection) -> Selection:
        k, kmax = ctx.budget(self.heavy_size), ctx.budget_max(self.heavy_size)
        if self.per_kv_head:
            return self._select_per_kv_head(ctx, sel, k, kmax)
        scores = self.score(ctx)
        if scores is not ctx.full_scores:
            idx, valid = top_rows(ctx.without(scores, sel, inplace=True), k, kmax)
            return sel.add(idx, valid, 0.0, ctx.kv)
        # the shared exact scores, masked in place (no copy): keys a row may not see stay -inf,
        # the selected keys' scores are put back
        taken = sel.idx.clamp(max=ctx.kv - 1)
        kept = scores.gather(-1, taken)
        idx, valid = top_rows(ctx.without(scores, sel, inplace=True), k, kmax)
        scores.scatter_(-1, taken, kept)
        return sel.add(idx, valid, 0.0, ctx.kv)

    def _select_per_kv_head(self, ctx: Context, sel: Selection, k: Tensor, kmax: int) -> Selection:
        g = ctx.groups  # the selection so far is shared (checked at build): one head per group
        scores = ctx.without(self.group_score(ctx), sel.of_kv_heads(g), inplace=True)
        idx, valid = top_rows(scores, k, kmax)
        return sel.add(idx.repeat_interleave(g, 1), valid.repeat_interleave(g, 1), 0.0, ctx.kv,
                       shared=True)


def top_rows(scores: Tensor, k: Tensor, kmax: int | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the k[row] highest finite entries of `scores` [b, H, q, kv].

    k broadcasts to [b, H, q]; `kmax` is an upper bound of k (read from k when None, a
    device sync). Returns (idx, valid) of shape [b, H, q, kmax].
    """
    k = k.expand(scores.shape[:3])
    if kmax is None:
        kmax = int(k.max()) if k.numel() else 0
    kmax = min(kmax, scores.shape[-1])
    if kmax == 0:
        empty = scores.new_zeros(*scores.shape[:3], 0)
        return empty.long(), empty.bool()
    # on CPU reading k is free; on an accelerator sorting avoids a sync
    uniform = scores.device.type == "cpu" and bool((k == kmax).all())
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        idx = ordered_ints(scores).topk(kmax, dim=-1, sorted=not uniform).indices
        valid = scores.gather(-1, idx) > NEG_INF
    else:
        vals, idx = scores.topk(kmax, dim=-1, sorted=not uniform)
        valid = vals > NEG_INF
    if not uniform:
        valid &= torch.arange(kmax, device=scores.device) < k.unsqueeze(-1)
    return idx, valid


def ordered_ints(x: Tensor) -> Tensor:
    """float32 -> int32 in the same order (-inf lowest, -0.0 just below +0.0; no NaN): the
    sign bit's flip of the other bits. `torch.topk` on CPU is ~1.4x faster on the ints (~10%
    with this conversion)."""
    bits = x.view(torch.int32)
    return bits ^ (bits >> 31).bitwise_and_(0x7FFFFFFF)


def count_true(mask: Tensor) -> Tensor:
    """True entries of each row of a bool [..., n] -> long [...]: bytes summed into int32,
    ~7x faster on CPU than summing the bools."""
    return mask.view(torch.uint8).sum(-1, dtype=torch.int32).long()


def compact(mask: Tensor, fill: int) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of each row of `mask` [..., n] -> (idx, valid) [..., w],
    w the largest row count (read from the device), padding `fill`. Few entries (w <= n / 8):
    from `nonzero`; else O(n) with a running count placing each True entry (int32 cumsum +
    scatter; on CPU faster than nonzero for dense masks, ~2x slower for sparse ones)."""
    n = mask.shape[-1]
    count = count_true(mask)
    width = int(count.max()) if count.numel() else 0
    valid = torch.arange(width, device=mask.device) < count.unsqueeze(-1)
    if width * 8 <= n:
        rows = mask.reshape(-1, n)
        row, col = rows.nonzero().unbind(1)  # sorted by row, then position
        start = count.reshape(-1).cumsum(0) - count.reshape(-1)
        idx = torch.full((rows.shape[0], width), fill, dtype=torch.long, device=mask.device)
        idx[row, torch.arange(row.shape[0], device=mask.device) - start[row]] = col
        return idx.view(*mask.shape[:-1], width), valid
    slot = mask.cumsum(-1, dtype=torch.int32).sub_(1).masked_fill_(~mask, width).long()
    idx = torch.full((*mask.shape[:-1], width + 1), fill, dtype=torch.long, device=mask.device)
    idx.scatter_(-1, slot, torch.arange(n, device=mask.device).expand(mask.shape))
    return idx[..., :width], valid


def draw_candidates(ctx: Context, sel: Selection, m: Tensor, mmax: int) -> tuple[Tensor, Tensor]:
    """m[row] (<= the row's candidates, <= mmax) keys drawn uniformly without replacement
    from the candidates (keys the row may see, not in `sel`) -> (idx, valid) [b, H, q, n].

    Few draws next to the keys: i.i.d. uniform draws over the row's causal range, rejecting
    masked, selected and repeated keys (a kv-wide map of each key's first draw, no sort); the
    first m survivors in draw order are a uniform random m-subset. The result has one entry
    per draw (a few more than mmax), the rejected ones invalid. Enough draws are made for the worst case with a wide margin; if a row
    is still short (checked: one device sync), or when m is not small next to kv, kv random
    numbers per row are ranked instead.
    """
    b, h, q = sel.idx.shape[:3]
    kv = ctx.kv
    if mmax == 0:
        empty = torch.zeros(b, h, q, 0, dtype=torch.long, device=ctx.key.device)
        return empty, empty.bool()
    need = mmax + sel.idx.shape[-1]  # distinct draws needed if every selected key is hit
    if 4 * need <= kv:
        draws = math.ceil(-kv * math.log1p(-need / kv) + 8 * math.sqrt(need) + 32)
        lo = first_allowed(ctx.allowed).unsqueeze(-1)  # [b, 1, q, 1]
        width = (ctx.positions[:, None] - lo + 1).clamp(min=1)
        u = ctx.rand((b, h, q, draws), torch.float64)
        r = lo + (u * width).long()  # [b, H, q, draws], each in the row's causal range
        order = torch.arange(draws, dtype=torch.int32, device=r.device).expand_as(r)
        first = torch.full((b, h, q, kv + 1), draws, dtype=torch.int32, device=r.device)
        first.scatter_(-1, sel.idx, -1)  # selected keys: never a first draw
        first.scatter_reduce_(-1, r, order, reduce="amin")  # earliest draw of each key
        ok = (first.gather(-1, r) == order) & ctx.allowed.expand(b, h, q, kv).gather(-1, r)
        ok &= ok.cumsum(-1) <= m.unsqueeze(-1)
        if not bool((count_true(ok) < m).any()):  # one sync: a short row is never kept
            return r, ok
    keys = ctx.without(ctx.rand((b, h, q, kv)), sel, inplace=True)
    return top_rows(keys, m, mmax)


def first_allowed(allowed: Tensor) -> Tensor:
    """Index of the first key each row may see, [b, 1, q]."""
    return allowed.to(torch.uint8).argmax(-1)  # uint8: ~40x faster than int32 on CPU


# --- attention kernels -------------------------------------------------------------------


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0):
    """Exactly transformers' eager attention: softmax(q k^T * scaling + mask) v.

    Returns (output [b, q, H, d], weights [b, H, q, kv]).
    """
    g = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(g, dim=1) if g > 1 else key
    value = value.repeat_interleave(g, dim=1) if g > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


class Workspace:
    """A reusable buffer for gathered keys: a fresh 50 MB allocation per decode step costs
    more in page faults than the gather itself on CPU."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def take(self, n: int, d: int, like: Tensor) -> Tensor:
        buf = self.buf
        if buf is None or buf.numel() < n * d or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buf = like.new_empty(max(n * d, 1))
        return buf[: n * d].view(n, d)


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


def _flat_rows(idx: Tensor, groups: int, r0: int, r1: int) -> Tensor:
    """Key indices [b, H, q, n] (each < kv) -> indices into `key_rows` with row strides r0, r1."""
    b, h = idx.shape[:2]
    heads = torch.arange(h, device=idx.device) // groups
    base = torch.arange(b, device=idx.device)[:, None] * r0 + heads[None, :] * r1
    return idx + base[:, :, None, None]


# Relative costs on CPU (1 thread) of one row of d values: read in a stream (matmul over all
# of K or V) = 1; gathered and dotted with q one query row at a time (`scores_at`, decode)
# ~ 1.6, in one batch ~ 6; gathered into a weighted sum (embedding_bag) ~ 1.5. An element of a
# [H, q, kv] float temporary ~ 5 / d.
GATHER_SCORE_COST = 1.6
GATHER_SCORE_BATCH_COST = 6.0
GATHER_VALUE_COST = 1.5
ROW_LOOP_MAX = 256
"""Query rows (b * H * q) up to which CPU gathers go one row at a time (`scores_at`)."""


def take_rows(rows: Tensor, idx: Tensor) -> Tensor:
    """rows[idx] for a 1-D idx: `embedding_bag` over bags of one row, ~1.3x faster than
    index_select on CPU."""
    return F.embedding_bag(idx.view(-1, 1), rows, mode="sum")


@contextmanager
def batched_paths():
    """Within the block CPU calls take the batched paths a GPU takes (no row loops): what
    `perf.attention` counts as a GPU's operator calls."""
    global ROW_LOOP_MAX
    saved, ROW_LOOP_MAX = ROW_LOOP_MAX, 0
    try:
        yield
    finally:
        ROW_LOOP_MAX = saved


def row_loop(device: torch.device, rows: int) -> bool:
    """Whether gathered scores are computed one query row at a time (CPU, few rows)."""
    return device.type == "cpu" and rows <= ROW_LOOP_MAX


def sparse_attention(ctx: Context, value: Tensor, sel: Selection, workspace: Workspace) -> Tensor:
    """Attention over the selected keys only, output [b, H, q, d].

    Scores of the selected keys: from the exact scores of all keys (computed once, shared
    with maskers such as oracle top-k) when a masker computed them or when that streams fewer
    rows than gathering the selected keys would cost, else from the gathered keys only.
    Values: an `embedding_bag` over the selected rows (reads only those), or, when the
    selections are large next to a kv head's keys, the selection becomes a bias over the
    scores and the values are read once per kv head (a matmul). The cheaper path is taken.
    A selection shared by each kv head's query heads (`Selection.shared`: sink, local,
    `per_kv_head` maskers) reads each selected key once per kv head (`shared_attention`).
    """
    hk, kv, d = ctx.key.shape[1], ctx.kv, ctx.key.shape[-1]
    if sel.dense is not None:  # as a bias over all keys, or as index lists when they are few
        h, q = sel.idx.shape[1:3]
        width = int(sel.count().max())
        if h * q * width * GATHER_VALUE_COST > hk * kv + 5 * h * q * kv * 3 / d:
            return _bias_attention(ctx, value, sel, workspace)
        sel = sel.indexed()
    b, h, q, n = sel.idx.shape
    if sel.shared and ctx.groups > 1 and b * hk * q * n * (
            GATHER_SCORE_COST + GATHER_VALUE_COST) <= 2 * b * hk * ctx.kv:
        return shared_attention(ctx, value, sel)
    dtype = ctx.query.dtype
    rows = h * q * n
    score_cost = GATHER_SCORE_COST if row_loop(ctx.key.device, b * h * q) else GATHER_SCORE_BATCH_COST
    if ctx.full_scores is None and rows * score_cost > hk * kv + 5 * h * q * kv / d:
        ctx.scores()
    if rows * GATHER_VALUE_COST <= hk * kv + 5 * h * q * kv * 3 / d:
        idx = sel.idx.clamp(max=kv - 1)
        s = ctx.scores_at(idx, workspace)
        p = torch.softmax(s + sel.logw, dim=-1).nan_to_num_(0.0)
        v_rows, r0, r1 = key_rows(value)
        flat = _flat_rows(idx, ctx.groups, r0, r1)
        out = F.embedding_bag(flat.reshape(-1, n), v_rows,
                              per_sample_weights=p.to(value.dtype).reshape(-1, n), mode="sum")
        return out.view(b, h, q, d).to(dtype)
    return _bias_attention(ctx, value, sel, workspace)


def _bias_attention(ctx: Context, value: Tensor, sel: Selection, workspace: Workspace) -> Tensor:
    """`sparse_attention` over all keys with the selection as a bias: log-weights on the
    selected keys, -inf elsewhere; the values are read once per kv head (a matmul)."""
    b, h, q, _ = sel.idx.shape
    kv = ctx.kv
    scores = ctx.scores()
    bias = workspace.take(b * h * q, kv + 1, scores).view(b, h, q, kv + 1)  # no page faults
    if sel.dense is None:
        bias.fill_(NEG_INF)
    else:  # 0 on the dense keys, -max elsewhere (exp gives exactly 0 next to a selected key's
        # score; arithmetic instead of a masked fill, which branches per key)
        bias[..., :kv].copy_(sel.dense).sub_(1.0).mul_(torch.finfo(bias.dtype).max)
        bias[..., kv] = NEG_INF
    bias.scatter_(-1, sel.idx, sel.logw)
    p = torch.softmax(bias[..., :kv].add_(scores), dim=-1).nan_to_num_(0.0)
    if sel.dense is not None:  # a row of -max everywhere comes out uniform: no key, no output
        empty = sel.count() == 0
        if bool(empty.any()):
            p.masked_fill_(empty.unsqueeze(-1), 0.0)
    out = torch.matmul(ctx.grouped(p.to(value.dtype)), value)
    return ctx.ungrouped(out).to(ctx.query.dtype)


def shared_attention(ctx: Context, value: Tensor, sel: Selection) -> Tensor:
    """`sparse_attention` for a selection shared by the query heads of each kv head
    (`Selection.shared`): a kv head's selected keys and values are gathered once and serve
    its g query heads as matmuls of g rows. Output [b, H, q, d]."""
    b, h, q, n = sel.idx.shape
    hk, g, d, kv = ctx.key.shape[1], ctx.groups, ctx.key.shape[-1], ctx.kv
    rows = b * hk * q
    idx = sel.of_kv_heads(g).idx.clamp(max=kv - 1)  # [b, Hk, q, n]

    def per_group(x: Tensor) -> Tensor:  # [b, H, q, f] -> [b * Hk * q, g, f]
        return x.unflatten(1, (hk, g)).transpose(2, 3).reshape(rows, g, x.shape[-1])

    k_rows, k0, k1 = key_rows(ctx.key)
    v_rows, v0, v1 = key_rows(value)
    k_flat = _flat_rows(idx, 1, k0, k1).reshape(rows, n)
    v_flat = _flat_rows(idx, 1, v0, v1).reshape(rows, n)
    query = per_group(ctx.query).to(ctx.key.dtype)
    logw = per_group(sel.logw)
    known = None if ctx.full_scores is None else per_group(ctx.full_scores.gather(-1, sel.idx.clamp(max=kv - 1)))
    if row_loop(ctx.key.device, rows):  # one kv head and query row at a time: gathers stay in cache
        out = torch.empty(rows, g, d, dtype=value.dtype)
        for r in range(rows):
            if known is None:
                s = torch.mm(query[r], take_rows(k_rows, k_flat[r]).t())
                s = s.float() * ctx.scaling
            else:
                s = known[r]
            p = torch.softmax(s + logw[r], -1).nan_to_num_(0.0).to(value.dtype)
            torch.mm(p, take_rows(v_rows, v_flat[r]), out=out[r])
    else:
        if known is None:
            keys = torch.index_select(k_rows, 0, k_flat.reshape(-1)).view(rows, n, d)
            known = torch.matmul(query, keys.transpose(1, 2)).float() * ctx.scaling
        p = torch.softmax(known + logw, -1).nan_to_num_(0.0).to(value.dtype)
        out = torch.matmul(p, torch.index_select(v_rows, 0, v_flat.reshape(-1)).view(rows, n, d))
    return out.view(b, hk, q, g, d).transpose(2, 3).reshape(b, h, q, d).to(ctx.query.dtype)


def size_of(size: Size, n: int) -> int:
    """`Context.budget` of one row that may see `n` keys (no tensors)."""
    return round(n * size) if isinstance(size, float) else min(int(size), n)


def decode_spans(maskers, q: int, kv: int, attention_mask: Tensor | None) -> tuple[list[tuple[int, int]], int]:
    """(spans, n): the keys the first n maskers select, as sorted disjoint ranges, when each
    of them selects one range (`decode_range`: sink, local) and the call is one query row that
    may see every key (decode, no mask); n = 0 otherwise. Ranges cost a few kernels where the
    index-list path runs ~60 small ones per masker, which is what a GPU pays per layer at batch
    1: with only ranges, attention reads slices of the cache on the dense kernel."""
    spans: list[tuple[int, int]] = []
    n = 0
    if q != 1 or attention_mask is not None:
        return spans, n
    for masker in maskers:
        span = masker.decode_range(kv)
        if span is None:
            break
        n += 1
        if span[1] > span[0]:
            spans.append(span)
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged, n


def row_blocks(b: int, h: int, q: int, kv: int, budget_bytes: int) -> list[tuple[int, int]]:
    """Query-row blocks [r0, r1) for one sparse call: a block's largest per-call temporary
    is a kv-wide row of 8-byte entries per head and row (index lists at full budget, the
    first-draw map of sampling; scores are float32, half that), so a block has
    budget_bytes // (b * H * (kv + 1) * 8) rows (at least one)."""
    rows = max(1, budget_bytes // (b * h * (kv + 1) * 8))
    return [(r0, min(q, r0 + rows)) for r0 in range(0, q, rows)]


def attend_blocks(maskers, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float, layer: int, generator: torch.Generator | None,
                  workspace: Workspace, budget_bytes: int) -> tuple[Tensor, Tensor]:
    """Sparse attention of every query row, the rows in blocks (`row_blocks`) so that no
    per-call tensor outgrows `budget_bytes` (a question of thousands of rows over 128k keys).
    A block of rows sees the keys up to its last row's position only (causal masks; a mask
    that lets a row see a later key is refused). Returns (output [b, H, q, d], the sum over
    rows and heads of the attended fraction of each row's keys)."""
    b, h, q, _ = query.shape
    kv = key.shape[2]
    outs, density = [], torch.zeros((), device=query.device)
    for r0, r1 in row_blocks(b, h, q, kv, budget_bytes):
        end = kv - q + r1
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, r0:r1] if mask.shape[2] == q else mask
            if end < kv and bool(allowed_from_mask(mask[..., end:kv], b, r1 - r0, kv - end,
                                                   query.device).any()):
                raise ValueError("sparse attention needs a causal mask: a query row may see a "
                                 "later key")
            mask = mask[..., :end]
        k, v = (key, value) if end == kv else (key[:, :, :end], value[:, :, :end])
        allowed = allowed_from_mask(mask, b, r1 - r0, end, query.device)
        ctx = Context(query[:, :, r0:r1], k, scaling, layer, allowed, generator)
        spans, ranged = decode_spans(maskers, r1 - r0, end, mask)
        sel = Selection.of_spans(spans, b, h, r1 - r0, query.device)
        for masker in list(maskers)[ranged:]:
            sel = masker.select(ctx, sel.indexed())
        outs.append(sparse_attention(ctx, v, sel, workspace))
        density = density + (sel.count().float() / ctx.n_keys.clamp(min=1).float()).sum()
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)), density


def allowed_from_mask(attention_mask: Tensor | None, b: int, q: int, kv: int, device) -> Tensor:
    """Bool [b, 1, q, kv] of the keys each query may attend to (causal when mask is None)."""
    if attention_mask is None:
        pos = torch.arange(kv, device=device)
        return (pos[None, :] <= (kv - q + torch.arange(q, device=device))[:, None]).expand(b, 1, q, kv)
    mask = attention_mask[:, :, :, :kv]
    if mask.dtype == torch.bool:
        return mask.expand(b, 1, q, kv)
    return (mask > torch.finfo(mask.dtype).min / 2).expand(b, 1, q, kv)


def log_weight(prob: Tensor) -> Tensor:
    """log(1 / pi) for inclusion probability pi."""
    return -torch.log(prob.clamp_min(1e-30))


def normal_quantile(p: float) -> float:
    """Phi^{-1}(p) of the standard normal (stdlib, no scipy)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


__all__ = [
    "Context", "KeyCache", "Masker", "Selection", "Workspace", "allowed_from_mask", "key_rows",
    "TopKMasker", "check_fraction", "eager_attention", "model_shapes", "first_allowed", "log_weight", "normal_quantile",
    "attend_blocks", "compact", "count_true", "decode_spans", "draw_candidates", "row_blocks", "size_of",
    "sparse_attention", "top_rows",
]
