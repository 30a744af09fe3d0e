"""The maskers (HashAttention, Double Sparsity and MagicPIG live in their own modules and are
re-exported here, so configs name every masker as `sa_bench.attention.maskers.<Class>`). Each is a dataclass of its YAML keys and one `select` that adds keys.

Sizes (`Size`): an int is a token count, a float in (0, 1] a fraction of the keys the query
row may see. "Candidates" are the keys a row may see that no earlier masker selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sa_bench.attention.base import (
    NEG_INF,
    Context,
    Masker,
    Selection,
    TopKMasker,
    check_fraction,
    first_allowed,
    log_weight,
    normal_quantile,
    top_rows,
)
from sa_bench.attention.double_sparsity import DoubleSparsity
from sa_bench.attention.hashattn import HashAttention
from sa_bench.attention.magicpig import MagicPig
from sa_bench.config import ConfigError, Size, check_range

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
        q = ctx.query.shape[2]
        pos = ctx.kv - q + torch.arange(q, device=w.device)  # position of each query row
        ar = torch.arange(wmax, device=w.device)
        idx = (pos[:, None] - ar).expand(*w.shape, wmax)  # [b, 1, q, wmax]
        ok = (idx >= 0) & (ar < w.unsqueeze(-1))
        idx = idx.clamp(min=0)
        valid = ok & ctx.allowed.gather(-1, idx)
        return sel.add(idx, valid & ~sel.contains(idx), 0.0, ctx.kv)


# --- top-k / top-p by a score ----------------------------------------------------------------


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
