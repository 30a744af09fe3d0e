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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sa_bench.config import ConfigError, Size

NEG_INF = float("-inf")


class Masker:
    """Base of all maskers: a dataclass of YAML keys plus `select`.

    Subclasses implement `select(ctx, sel) -> Selection`, returning `sel` with keys added.
    `reset()` drops per-context state, `truncate(layer, n)` per-layer key caches beyond key
    `n`, `prepare(model_config, key)` loads/validates files against the model, `notes()`
    describes fallbacks for the results.
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


def model_shapes(model_config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a transformers config."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, kv_heads, head_dim


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

    @classmethod
    def empty(cls, b: int, h: int, q: int, device) -> Selection:
        return cls(torch.empty(b, h, q, 0, dtype=torch.long, device=device),
                   torch.empty(b, h, q, 0, dtype=torch.float32, device=device))

    @property
    def valid(self) -> Tensor:
        return self.logw > NEG_INF

    def add(self, idx: Tensor, valid: Tensor, logw: Tensor | float, kv: int) -> Selection:
        """Append `idx` (broadcast to [b, H, q, m]); invalid entries become padding."""
        shape = (*self.idx.shape[:3], idx.shape[-1])
        idx, valid = idx.expand(shape), valid.expand(shape)
        logw = torch.as_tensor(logw, dtype=torch.float32, device=idx.device).expand(shape)
        idx = torch.where(valid, idx, kv)
        logw = torch.where(valid, logw, NEG_INF)
        return Selection(torch.cat([self.idx, idx], -1), torch.cat([self.logw, logw], -1))

    def contains(self, idx: Tensor) -> Tensor:
        """Whether each candidate in `idx` [b, 1|H, q, m] is already selected -> [b, H, q, m]."""
        if self.idx.shape[-1] == 0:
            return torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        return (idx.unsqueeze(-1) == self.idx.unsqueeze(-2)).any(-1)


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
        buf = self.buf.get(layer)
        keep = min(self.length.get(layer, 0), kv - n_new)
        if buf is not None and buf.shape[0] != key.shape[0]:
            buf, keep = None, 0
        if keep < kv:
            new = fn(key[:, :, keep:])
            if buf is None or buf.shape[2] < kv or buf.dtype != new.dtype:
                old = buf[:, :, :keep] if buf is not None else new[:, :, :0]
                cap = kv + kv // 2 + 256
                grown = new.new_empty(*new.shape[:2], cap, *new.shape[3:])
                grown[:, :, :keep] = old
                buf = self.buf[layer] = grown
            buf[:, :, keep:kv] = new
        self.length[layer] = kv
        return buf[:, :, :kv]


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
            self._n_keys = self.allowed.sum(-1)
        return self._n_keys

    def budget(self, size: Size) -> Tensor:
        """Keys per row [b, 1, q]: an int is a count, a float a fraction of the row's keys."""
        n = self.n_keys
        if isinstance(size, float):
            return torch.round(n.double() * size).long()
        return n.clamp(max=int(size))

    def grouped(self, x: Tensor) -> Tensor:
        """[b, H, q, f] -> [b, Hk, g*q, f] so one matmul per kv head serves its query heads."""
        b, h, q, f = x.shape
        return x.reshape(b, self.key.shape[1], self.groups * q, f)

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
            s = self.score_with(self.query, self.key) * self.scaling
            self.full_scores = s.float()
        return self.full_scores

    def candidates(self, sel: Selection) -> Tensor:
        """Bool [b, H, q, kv]: keys a row may see that are not selected yet."""
        b, h, q, _ = sel.idx.shape
        taken = torch.zeros(b, h, q, self.kv + 1, dtype=torch.bool, device=self.key.device)
        taken.scatter_(-1, sel.idx, True)
        return self.allowed & ~taken[..., : self.kv]

    def rand(self, shape) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.key.device)


class TopKMasker(Masker):
    """Shared top-k step: the `heavy_size` candidates with the highest `score`."""

    heavy_size: Size

    def score(self, ctx: Context) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def select(self, ctx: Context, sel: Selection) -> Selection:
        scores = self.score(ctx).masked_fill(~ctx.candidates(sel), NEG_INF)
        idx, valid = top_rows(scores, ctx.budget(self.heavy_size))
        return sel.add(idx, valid, 0.0, ctx.kv)


def top_rows(scores: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the k[row] highest finite entries of `scores` [b, H, q, kv].

    k broadcasts to [b, H, q]. Returns (idx, valid) of shape [b, H, q, max k].
    """
    k = k.expand(scores.shape[:3])
    kmax = min(int(k.max()) if k.numel() else 0, scores.shape[-1])
    if kmax == 0:
        empty = scores.new_zeros(*scores.shape[:3], 0)
        return empty.long(), empty.bool()
    uniform = bool((k == kmax).all())
    vals, idx = scores.topk(kmax, dim=-1, sorted=not uniform)
    valid = vals > NEG_INF
    if not uniform:
        valid &= torch.arange(kmax, device=scores.device) < k.unsqueeze(-1)
    return idx, valid


def first_allowed(allowed: Tensor) -> Tensor:
    """Index of the first key each row may see, [b, 1, q]."""
    return allowed.int().argmax(-1)


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


def _flat_rows(ctx: Context, idx: Tensor) -> Tensor:
    """Key indices [b, H, q, n] -> row indices into key.reshape(-1, d)."""
    b, hk, kv, _ = ctx.key.shape
    heads = torch.arange(ctx.query.shape[1], device=idx.device) // ctx.groups
    base = (torch.arange(b, device=idx.device)[:, None] * hk + heads[None, :]) * kv
    return idx.clamp(max=kv - 1) + base[:, :, None, None]


def sparse_attention(ctx: Context, value: Tensor, sel: Selection, workspace: Workspace) -> Tensor:
    """Attention over the selected keys only, output [b, H, q, d].

    Gather path (few keys per row): scores of the selected keys come from the maskers' exact
    scores when one computed them, else from the gathered keys; the weighted sum of values is
    an `embedding_bag` (reads only the selected rows). Otherwise (many query rows, as in the
    question phase) the selection is scattered into a bias over the dense score matrix.
    """
    b, h, q, n = sel.idx.shape
    kv, d = ctx.kv, ctx.key.shape[-1]
    dtype = ctx.query.dtype
    if q * n <= kv:
        rows = _flat_rows(ctx, sel.idx)
        if ctx.full_scores is not None:
            s = ctx.full_scores.gather(-1, sel.idx.clamp(max=kv - 1))
        else:
            keys = workspace.take(rows.numel(), d, ctx.key)
            torch.index_select(ctx.key.reshape(-1, d), 0, rows.reshape(-1), out=keys)
            s = torch.bmm(keys.view(b * h * q, n, d), ctx.query.reshape(b * h * q, d, 1))
            s = s.view(b, h, q, n).float() * ctx.scaling
        p = torch.softmax(s + sel.logw, dim=-1).nan_to_num_(0.0)
        out = F.embedding_bag(rows.reshape(-1, n), value.reshape(-1, d),
                              per_sample_weights=p.to(value.dtype).reshape(-1, n), mode="sum")
        return out.view(b, h, q, d).to(dtype)
    bias = torch.full((b, h, q, kv + 1), NEG_INF, device=sel.idx.device)
    bias.scatter_(-1, sel.idx, sel.logw)
    s = ctx.full_scores if ctx.full_scores is not None else ctx.scores()
    p = torch.softmax(s + bias[..., :kv], dim=-1).nan_to_num_(0.0).to(value.dtype)
    out = torch.matmul(ctx.grouped(p), value)
    return ctx.ungrouped(out).to(dtype)


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
    "Context", "KeyCache", "Masker", "Selection", "Workspace", "allowed_from_mask",
    "TopKMasker", "check_fraction", "eager_attention", "model_shapes", "first_allowed", "log_weight", "normal_quantile",
    "sparse_attention", "top_rows",
]
