"""The maskers. Each is a dataclass of its YAML keys and one `select` that adds keys.

Sizes (`Size`): an int is a token count, a float in (0, 1] a fraction of the keys the query
row may see. "Candidates" are the keys a row may see that no earlier masker selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sa_bench.attention.base import (
    NEG_INF,
    Context,
    KeyCache,
    Masker,
    Selection,
    check_fraction,
    first_allowed,
    log_weight,
    normal_quantile,
    top_rows,
)
from sa_bench.attention.hashattn import HashWeights
from sa_bench.config import ConfigError, Size, check_range


def _new_rows(ctx: Context) -> int:
    return ctx.query.shape[2]


def _model_shapes(model_config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a transformers config."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, kv_heads, head_dim


# --- deterministic ranges ------------------------------------------------------------------


@dataclass
class Sink(Masker):
    """Attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453): the first `size`
    keys a query may see, {j0, ..., j0 + s - 1} with j0 the first unmasked key."""

    size: Size = 4

    def select(self, ctx: Context, sel: Selection) -> Selection:
        s = ctx.budget(self.size)
        smax = int(s.max())
        ar = torch.arange(smax, device=s.device)
        idx = first_allowed(ctx.allowed).unsqueeze(-1) + ar  # [b, 1, q, smax]
        idx = idx.clamp(max=ctx.kv - 1)
        valid = (ar < s.unsqueeze(-1)) & ctx.allowed.gather(-1, idx)
        return sel.add(idx, valid & ~sel.contains(idx), 0.0, ctx.kv)


@dataclass
class Local(Masker):
    """Local window (StreamingLLM, https://arxiv.org/abs/2309.17453): the last `size` keys
    up to and including the query's own position t, {t - w + 1, ..., t} (causal)."""

    size: Size = 64

    def select(self, ctx: Context, sel: Selection) -> Selection:
        w = ctx.budget(self.size)
        wmax = int(w.max())
        q = _new_rows(ctx)
        pos = ctx.kv - q + torch.arange(q, device=w.device)  # position of each query row
        ar = torch.arange(wmax, device=w.device)
        idx = (pos[:, None] - ar).expand(*w.shape, wmax)  # [b, 1, q, wmax]
        ok = (idx >= 0) & (ar < w.unsqueeze(-1))
        idx = idx.clamp(min=0)
        valid = ok & ctx.allowed.gather(-1, idx)
        return sel.add(idx, valid & ~sel.contains(idx), 0.0, ctx.kv)


# --- top-k / top-p by a score ----------------------------------------------------------------


class TopKMasker(Masker):
    """Shared top-k step: the `heavy_size` candidates with the highest `score`."""

    heavy_size: Size

    def score(self, ctx: Context) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def select(self, ctx: Context, sel: Selection) -> Selection:
        scores = self.score(ctx).masked_fill(~ctx.candidates(sel), NEG_INF)
        idx, valid = top_rows(scores, ctx.budget(self.heavy_size))
        return sel.add(idx, valid, 0.0, ctx.kv)


@dataclass
class OracleTopK(TopKMasker):
    """Oracle top-k: the k candidates with the highest exact score q.k."""

    heavy_size: Size = 0.1

    def score(self, ctx: Context) -> Tensor:
        return ctx.scores()


@dataclass
class OracleTopP(Masker):
    """Oracle top-p: the smallest set of candidates whose softmax mass reaches p, with the
    softmax taken over the candidates: sort p_j = softmax(q.k)_j descending and keep
    key i while the mass before it is < p."""

    top_p: float = 0.9

    def __post_init__(self) -> None:
        check_fraction(self.top_p, "top_p")

    def select(self, ctx: Context, sel: Selection) -> Selection:
        scores = ctx.scores().masked_fill(~ctx.candidates(sel), NEG_INF)
        probs = torch.softmax(scores, -1).nan_to_num_(0.0)
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        keep = (before < self.top_p) & (sorted_p > 0)
        n = int(keep.sum(-1).max()) if keep.numel() else 0
        return sel.add(order[..., :n], keep[..., :n], 0.0, ctx.kv)


@dataclass
class HashAttention(TopKMasker):
    """HashAttention top-k (Desai et al., 2024, https://arxiv.org/abs/2412.14468).

    Per layer and kv head, learned MLPs f, g map q and k to `bits`-bit sign signatures;
    score(q, k) = #agreeing bits = (bits + sign(f(q)) . sign(g(k))) / 2; top-k by score.
    Key signatures are cached across decode steps. `weights`: safetensors file written by
    `python -m sa_bench.attention.train_hashattn`; null = random-projection signatures
    f = g = x R, R Gaussian [d, bits] per layer/kv head (SimHash), labelled in the notes.
    """

    heavy_size: Size = 0.1
    weights: str | None = None
    bits: int = 32
    seed: int = 0
    _sigs: KeyCache = field(default_factory=KeyCache, init=False, repr=False)
    _w: HashWeights | None = field(default=None, init=False, repr=False)
    _proj: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.bits, "bits", 1, 1024)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"weights: hashattn weights file not found: {self.weights}")

    def prepare(self, model_config, key: str) -> None:
        if self.weights is None:
            return
        layers, _, kv_heads, head_dim = _model_shapes(model_config)
        w = HashWeights.load(self.weights, f"{key}.weights")
        w.check(layers, kv_heads, head_dim, f"{key}.weights")
        self._w = w

    def notes(self) -> list[str]:
        if self._w is None:
            return [f"hashattn: random-projection signatures ({self.bits} bits, no weights file)"]
        return [f"hashattn: learned signatures from {self.weights} ({self._w.bits} bits)"]

    def _project(self, side: str, layer: int, x: Tensor) -> Tensor:
        if self._w is not None:
            if self._w.tensors["query.w1"].device != x.device:
                self._w = self._w.to(x.device)
            return self._w.project(side, layer, x)
        r = self._proj.get(layer)
        if r is None or r.device != x.device:
            g = torch.Generator().manual_seed(self.seed * 100003 + layer)
            r = torch.randn(x.shape[1], x.shape[-1], self.bits, generator=g).to(x.device)
            self._proj[layer] = r
        return torch.matmul(x, r.to(x.dtype).unsqueeze(0))

    def score(self, ctx: Context) -> Tensor:
        def sign(x: Tensor) -> Tensor:
            return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)

        sk = self._sigs.get(ctx.layer, ctx.key, _new_rows(ctx),
                            lambda k: sign(self._project("key", ctx.layer, k)))
        sq = sign(self._project("query", ctx.layer, ctx.grouped(ctx.query)))
        agree = torch.matmul(sq, sk.transpose(-1, -2))  # +-1 dot product, [b, Hk, g*q, kv]
        return ctx.ungrouped(agree)


@dataclass
class Quest(TopKMasker):
    """Quest (Tang et al., 2024, https://arxiv.org/abs/2406.10774): keys in pages of
    `page_size`; per page and channel d the min m_d and max M_d of the keys; page score
    sum_d max(q_d m_d, q_d M_d) (an upper bound of q.k in the page); the best pages are kept,
    filling the budget of `heavy_size` keys in page-score order (the last page may be cut)."""

    heavy_size: Size = 0.1
    page_size: int = 16

    def __post_init__(self) -> None:
        check_range(self.page_size, "page_size", 1)

    def score(self, ctx: Context) -> Tensor:
        p, kv = self.page_size, ctx.kv
        key = ctx.key
        pad = (-kv) % p
        if pad:
            key = torch.cat([key, key[:, :, -1:].expand(-1, -1, pad, -1)], 2)
        pages = key.reshape(*key.shape[:2], -1, p, key.shape[-1])
        lo, hi = pages.amin(3), pages.amax(3)  # [b, Hk, pages, d]
        q = ctx.query
        page_score = ctx.score_with(q.clamp(min=0), hi) + ctx.score_with(q.clamp(max=0), lo)
        return page_score.repeat_interleave(p, dim=-1)[..., :kv].float()


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

        layers, heads, _, head_dim = _model_shapes(model_config)
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


# --- sampling --------------------------------------------------------------------------------


def _uniform_sample(ctx: Context, cand: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """m[row] candidates drawn uniformly without replacement -> (idx, valid)."""
    keys = ctx.rand(cand.shape).masked_fill_(~cand, NEG_INF)
    return top_rows(keys, m)


@dataclass
class RandomSampling(Masker):
    """Uniform random sampling: m = round(rate * n) of the row's n keys, drawn uniformly
    without replacement from the R candidates; inclusion probability pi = m / R, weight 1/pi."""

    rate: float = 0.1

    def __post_init__(self) -> None:
        check_fraction(self.rate, "rate")

    def select(self, ctx: Context, sel: Selection) -> Selection:
        cand = ctx.candidates(sel)
        n_rem = cand.sum(-1)  # [b, H, q]
        m = torch.minimum(ctx.budget(self.rate), n_rem)
        idx, valid = _uniform_sample(ctx, cand, m)
        pi = (m.float() / n_rem.clamp(min=1).float()).unsqueeze(-1)
        return sel.add(idx, valid, log_weight(pi), ctx.kv)


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
        kc = self._codes.get(ctx.layer, ctx.key, _new_rows(ctx),
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


@dataclass
class AdaptiveSampling(Masker):
    """vAttention adaptive sampling (Desai et al., 2025, https://arxiv.org/abs/2510.05688).

    Over the R candidates (keys not selected deterministically before, e.g. sink/local/top-k),
    a base sample of b0 = max(2, base_rate) keys estimates the spread sigma of the terms
    e_j = exp(s_j - c) of the softmax denominator. With D = sum_{selected} e_j + R mean(e_base)
    the estimated denominator, the sample size that bounds the relative error of the
    denominator estimate by `epsilon` with probability 1 - `delta` (CLT) is
        m = (z_{1 - delta/2} * R * sigma / (epsilon * D))^2,  clamped to [b0, R].
    m candidates are sampled uniformly (the base sample is part of it), weight R / m.
    """

    base_rate: Size = 0.02
    epsilon: float = 0.1
    delta: float = 0.05

    def __post_init__(self) -> None:
        check_fraction(self.epsilon, "epsilon")
        check_range(self.delta, "delta", 0.0, 1.0, low_open=True)
        if self.delta >= 1.0:
            raise ConfigError(f"delta: expected a value in (0, 1), got {self.delta}")

    def select(self, ctx: Context, sel: Selection) -> Selection:
        cand = ctx.candidates(sel)
        n_rem = cand.sum(-1)  # [b, H, q]
        order = ctx.rand(cand.shape).masked_fill_(~cand, NEG_INF).argsort(-1, descending=True)
        b0 = torch.minimum(ctx.budget(self.base_rate).clamp(min=2), n_rem)
        b0max = int(b0.max()) if b0.numel() else 0
        if b0max == 0:
            return sel
        scores = ctx.scores()
        ar = torch.arange(order.shape[-1], device=order.device)
        base_ok = ar[:b0max] < b0.unsqueeze(-1)
        base_s = scores.gather(-1, order[..., :b0max]).masked_fill(~base_ok, NEG_INF)
        det_s = scores.gather(-1, sel.idx.clamp(max=ctx.kv - 1)).masked_fill(~sel.valid, NEG_INF)
        det_s = torch.cat([det_s, base_s.new_full((*det_s.shape[:3], 1), NEG_INF)], -1)
        c = torch.maximum(base_s.amax(-1, keepdim=True), det_s.amax(-1, keepdim=True))
        c = c.nan_to_num(0.0, neginf=0.0)
        e = torch.exp(base_s - c)
        nb = base_ok.sum(-1).clamp(min=1)
        mean = e.sum(-1) / nb
        var = ((e - mean.unsqueeze(-1)) ** 2 * base_ok).sum(-1) / (nb - 1).clamp(min=1)
        denom = torch.exp(det_s - c).sum(-1) + n_rem * mean
        z = normal_quantile(1.0 - self.delta / 2.0)
        m = (z * n_rem * var.sqrt() / (self.epsilon * denom).clamp_min(1e-30)) ** 2
        m = torch.minimum(torch.maximum(m.ceil().nan_to_num(0.0).long(), b0), n_rem)
        mmax = int(m.max()) if m.numel() else 0
        valid = ar[:mmax] < m.unsqueeze(-1)
        pi = (m.float() / n_rem.clamp(min=1).float()).unsqueeze(-1)
        return sel.add(order[..., :mmax], valid, log_weight(pi), ctx.kv)


__all__ = [
    "AdaptiveSampling", "DoubleSparsity", "HashAttention", "Local", "MagicPig", "OracleTopK",
    "OracleTopP", "Quest", "RandomSampling", "Sink", "TopKMasker",
]
