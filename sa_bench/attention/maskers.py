"""The maskers that need no fitted files or tables of their own: sink and local ranges,
oracle top-k / top-p, Quest, uniform and adaptive (vAttention) sampling. HashAttention and
random-projection top-k (`hashattn`), Double Sparsity (`double_sparsity`) and MagicPIG
(`magicpig`) live in their own modules. Each is a dataclass of its YAML keys and one
`select` that adds keys.

Sizes (`Size`): an int is a token count, a float in (0, 1] a fraction of the keys the query
row may see. "Candidates" are the keys a row may see that no earlier masker selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING

from sa_bench.attention.masker import (
    Masker,
    TopKMasker,
    candidates_known,
    check_fraction,
    draw_candidates,
    top_ranks,
)
from sa_bench.attention.ops import (
    NEG_INF,
    compact,
    count_true,
    first_allowed,
    log_weight,
    reads_free,
    top_rows,
)
from sa_bench.attention.selection import Context, KeyCache, Selection, size_of
from sa_bench.config import ConfigError, Size, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

# --- deterministic ranges ------------------------------------------------------------------


@dataclass
class Sink(Masker):
    """Attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453): the first `size`
    keys a query may see, {j0, ..., j0 + s - 1} with j0 the first unmasked key."""

    group_shared = True  # the same keys for every query head (not a config key)
    budget_fields = ("size",)  # size 0 selects nothing: the same job key as no sink
    size: Size = 4

    def select(self, ctx: Context, sel: Selection) -> Selection:
        s = ctx.budget(self.size)
        ar = torch.arange(ctx.budget_max(self.size), device=s.device)
        idx = first_allowed(ctx.allowed).unsqueeze(-1) + ar  # [b, 1, q, smax]
        idx = idx.clamp(max=ctx.kv - 1)
        valid = (ar < s.unsqueeze(-1)) & ctx.allowed.gather(-1, idx)
        return sel.add(idx, valid & ~sel.contains(idx, ctx.kv), 0.0, ctx.kv, shared=True)

    def decode_range(self, kv: int) -> tuple[int, int]:
        return 0, size_of(self.size, kv)


@dataclass
class Local(Masker):
    """Local window (StreamingLLM, https://arxiv.org/abs/2309.17453): the last `size` keys
    up to and including the query's own position t, {t - w + 1, ..., t} (causal)."""

    group_shared = True  # the same keys for every query head (not a config key)
    budget_fields = ("size",)  # size 0 selects nothing: the same job key as no local window
    size: Size = 64

    def select(self, ctx: Context, sel: Selection) -> Selection:
        w = ctx.budget(self.size)
        ar = torch.arange(ctx.budget_max(self.size), device=w.device)
        idx = (ctx.positions[:, None] - ar).expand(*w.shape, ar.shape[0])  # [b, 1, q, wmax]
        ok = (idx >= 0) & (ar < w.unsqueeze(-1))
        idx = idx.clamp(min=0)
        valid = ok & ctx.allowed.gather(-1, idx)
        return sel.add(idx, valid & ~sel.contains(idx, ctx.kv), 0.0, ctx.kv, shared=True)

    def decode_range(self, kv: int) -> tuple[int, int]:
        return kv - size_of(self.size, kv), kv


# --- top-k / top-p by a score ----------------------------------------------------------------


@dataclass
class OracleTopK(TopKMasker):
    """Oracle top-k: the k candidates with the highest exact score q.k."""

    heavy_size: Size = 0.1
    per_kv_head: bool = False

    def score(self, ctx: Context) -> Tensor:
        return ctx.scores()


FIXED_ONE = float(2**40)
"""Probability 1 in `OracleTopP`'s integer mass per bin: 2^40 keeps 40 bits of each p and sums
a row of up to 2^23 keys (p <= 1 each) in int64 without overflow."""


@dataclass
class OracleTopP(Masker):
    """Oracle top-p: the smallest set of candidates whose softmax mass reaches p, with the
    softmax taken over the candidates: sort p_j = softmax(q.k)_j descending and keep
    key i while the mass before it is < p.

    Without a sort of all keys: candidates are binned by the float bits of p_j (exponent and
    five mantissa bits: 32 bins per octave); every key of the bins above the one where the
    mass reaches p is kept (a dense mask: on flat attention most keys), and only that bin is
    sorted. On CPU the bin's keys are compacted first (their count read, free); an accelerator
    sorts the whole row with the other keys at -1 instead (one kernel per row of up to 4096
    keys, a segmented sort beyond), as reading the count would be a device sync.
    """

    top_p: float = 0.9

    def __post_init__(self) -> None:
        check_fraction(self.top_p, "top_p")

    def select(self, ctx: Context, sel: Selection) -> Selection:
        kv, nb = ctx.kv, 4096  # bins: p's bits >> 18 < 4096 for 0 <= p <= 1
        probs = torch.softmax(ctx.without(ctx.scores(), sel), -1)
        if not candidates_known(ctx, sel):  # a row may have no candidate: NaN
            probs = probs.nan_to_num_(0.0)
        rows = probs.shape[:3]

        def make_first_bin() -> Tensor:
            return torch.arange(rows.numel(), device=probs.device).view(*rows, 1) * nb

        first_bin = make_first_bin() if ctx.workspace is None else ctx.workspace.cached(
            ("topp_bins", tuple(rows), nb), make_first_bin)  # int64: bins index without a copy
        bins = torch.add(torch.bitwise_right_shift(probs.view(torch.int32), 18), first_bin)
        # each bin's mass in integers (fixed point, 2^-40): a float sum by atomics (CUDA's
        # weighted bincount) depends on the order of the additions - not reproducible
        fixed = probs.mul(FIXED_ONE).add_(0.5).to(torch.int64)  # exact scaling, p rounded to 2^-40
        mass = torch.zeros(rows.numel() * nb, dtype=torch.int64, device=probs.device)
        mass = mass.scatter_add_(0, bins.view(-1), fixed.view(-1)).view(*rows, nb)
        upward = mass.cumsum(-1)
        higher = upward[..., -1:] - upward  # mass of the bins above this one (exact integers)
        above = higher + mass  # mass of the bins from this one up
        edge = ((above >= round(self.top_p * FIXED_ONE)).sum(-1, keepdim=True) - 1).clamp_(min=0)  # the bin reaching p
        before_edge = higher.gather(-1, edge).float().mul_(1.0 / FIXED_ONE)
        edge = edge + first_bin
        in_edge = bins == edge
        if reads_free(probs.device):  # the edge bin's keys (its size read: free on CPU)
            positions = None if ctx.workspace is None else ctx.workspace.arange(kv + 1)
            idx, ok = compact(in_edge, kv, positions)
            vals = torch.where(ok, probs.gather(-1, idx.clamp(max=kv - 1)), -1.0)
        else:  # no read of its size (a sync): the whole row sorted, the other keys -1 (last)
            idx, vals = None, torch.where(in_edge, probs, -1.0)
        # stable: tied probabilities in key order on both paths
        vals, order = vals.sort(dim=-1, descending=True, stable=True)
        before = before_edge + vals.cumsum(-1) - vals
        ok = (before < self.top_p) & (vals > 0)
        out = sel.add(order if idx is None else idx.gather(-1, order), ok, 0.0, kv)
        return Selection(out.idx, out.logw, False, bins > edge,  # bin 0 (p = 0) never: edge >= 0
                         some_valid=sel.some_valid)


class PageStats(KeyCache):
    """Per-layer [max | min] over the keys of each page, [b, Hk, pages, 2d], kept as the KV
    cache grows: a call recomputes only the pages holding keys not seen before (the last,
    partly filled page and new ones), never all of K; `truncate` (DynamicCache.crop) makes
    the pages from the cut on be recomputed."""

    def pages(self, layer: int, key: Tensor, n_new: int, size: int) -> Tensor:
        kv = key.shape[2]
        first = self.kept(layer, key, n_new) // size
        tail = key[:, :, first * size:]
        full, rest = divmod(tail.shape[2], size)
        if full or rest:  # min and max written into the buffer's halves: one kernel a step
            b, hk, _, d = key.shape
            out = self.rows(layer, first, full + (rest > 0), key.new_empty(b, hk, 0, 2 * d))
            if full:
                torch.aminmax(tail[:, :, : full * size].unflatten(2, (full, size)), dim=3,
                              out=(out[:, :, :full, d:], out[:, :, :full, :d]))
            if rest:
                torch.aminmax(tail[:, :, full * size:], dim=2, keepdim=True,
                              out=(out[:, :, full:, d:], out[:, :, full:, :d]))
        self.length[layer] = kv
        return self.buf[layer][:, :, : -(-kv // size)]


@dataclass
class Quest(Masker):
    """Quest (Tang et al., 2024, https://arxiv.org/abs/2406.10774): keys in pages of
    `page_size`; per page and channel d the min m_d and max M_d of the keys; page score
    sum_d max(q_d m_d, q_d M_d) (an upper bound of q.k in the page); the best pages are kept,
    filling the budget of `heavy_size` keys in page-score order (the last page may be cut).
    Page statistics are cached and updated incrementally (`PageStats`). `per_kv_head`: one
    page set per kv head, by the highest page score among its query heads (GQA variant, as
    `TopKMasker`)."""

    heavy_size: Size = 0.1
    page_size: int = 16
    per_kv_head: bool = False
    _pages: PageStats = field(default_factory=PageStats, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.page_size, "page_size", 1)

    def select(self, ctx: Context, sel: Selection) -> Selection:
        p, kv = self.page_size, ctx.kv
        bmax = ctx.budget_max(self.heavy_size)
        if bmax == 0:
            return sel
        stats = self._pages.pages(ctx.layer, ctx.key, ctx.query.shape[2], p)  # [b, Hk, P, 2d]
        score = ctx.score_with(self._split(ctx), stats).float()
        n_pages = score.shape[-1]
        uniform = ctx.uniform_keys is not None  # every page seen (decode): all scores finite
        if not uniform:
            start = torch.arange(n_pages, device=ctx.key.device) * p
            lo = first_allowed(ctx.allowed).unsqueeze(-1)  # pages outside the row's keys: -inf
            seen = (start + p > lo) & (start <= ctx.positions[:, None])
            score = score.masked_fill_(~seen, NEG_INF)
        # enough pages for the budget plus already selected keys and two partly seen pages
        take = min(n_pages, -(-(bmax + sel.idx.shape[-1]) // p) + 2)
        if self.per_kv_head:
            score = ctx.group_max(score)
        vals, top = score.topk(take, -1, sorted=True)
        if self.per_kv_head:
            vals, top = vals.repeat_interleave(ctx.groups, 1), top.repeat_interleave(ctx.groups, 1)
        offsets = torch.arange(p, device=ctx.key.device) if ctx.workspace is None else ctx.workspace.arange(p)
        keys = torch.add(offsets, top.unsqueeze(-1), alpha=p).flatten(-2)
        ok = sel.unselected(keys, kv)
        budget = ctx.row_budget(self.heavy_size)
        if uniform and not reads_free(keys.device) and (
                take < n_pages or (candidates_known(ctx, sel) or 0) >= budget):
            return sel.add(_first_true(keys, ok, budget), None, 0.0, kv, shared=self.per_kv_head)
        if not uniform:
            ok &= (vals > NEG_INF).repeat_interleave(p, -1)
        keys = keys.clamp(max=kv - 1)
        if not ctx.all_allowed:
            ok &= ctx.allowed.expand(*keys.shape[:3], kv).gather(-1, keys)
        ok &= ok.cumsum(-1, dtype=torch.int32) <= (budget if isinstance(budget, int) else budget.unsqueeze(-1))
        return sel.add(keys, ok, 0.0, kv, shared=self.per_kv_head)

    @staticmethod
    def _split(ctx: Context) -> Tensor:
        """[max(q, 0) | min(q, 0)] [b, H, q, 2d], the query side of the page bound: one clamp
        of q broadcast against [2, d] bounds made once per device (the workspace's), else two
        clamps and a cat."""
        q = ctx.query
        if ctx.workspace is None:
            return torch.cat([q.clamp(min=0), q.clamp(max=0)], -1)
        d, inf = q.shape[-1], float("inf")
        lo, hi = ctx.workspace.cached(("quest_bounds", d, q.dtype), lambda: (
            torch.tensor([[0.0] * d, [-inf] * d], dtype=q.dtype, device=q.device),
            torch.tensor([[inf] * d, [0.0] * d], dtype=q.dtype, device=q.device)))
        return torch.clamp(q.unsqueeze(-2), lo, hi).flatten(-2)


def _first_true(keys: Tensor, ok: Tensor, n: int) -> Tensor:
    """The first n entries of each row of `keys` [..., m] where `ok` holds (every row has at
    least n), in order, [..., n]: without padding, the selection stays `exact` (no weights,
    no clamp, its count known), 8 launches fewer on an accelerator than the padded entries
    and their count (CPU keeps the padded entries: a softmax over other columns
    rounds otherwise, and its outputs stay as they were). Each kept entry goes to its rank
    among the row's ok entries (a cumsum); the others to a column dropped after."""
    rank = ok.cumsum(-1)
    out = keys.new_empty(*keys.shape[:-1], keys.shape[-1] + 1)
    return out.scatter_(-1, torch.where(ok, rank, 0), keys)[..., 1:n + 1]


# --- sampling --------------------------------------------------------------------------------


def _remaining(ctx: Context, sel: Selection) -> Tensor | int:
    """Candidates per row [b, H, q]: the row's keys less the (distinct, allowed) selected; an
    int when known without reading tensors (`candidates_known`: decode after ranges, top-k)."""
    known = candidates_known(ctx, sel)
    return known if known is not None else ctx.n_keys - count_true(sel.valid)


def _at_most(x: Tensor, n: Tensor | int) -> Tensor:
    return x.clamp(max=n) if isinstance(n, int) else torch.minimum(x, n)


def _inclusion(m: Tensor, n_rem: Tensor | int) -> Tensor:
    """Inclusion probability m / R (float32) of m of R candidates drawn, [..., 1]."""
    rem = float(max(n_rem, 1)) if isinstance(n_rem, int) else n_rem.clamp(min=1)
    return (m / rem).unsqueeze(-1)  # a true division: float32 from integers


@dataclass
class RandomSampling(Masker):
    """Uniform random sampling: m = round(rate * n) of the row's n keys, drawn uniformly
    without replacement from the R candidates; inclusion probability pi = m / R, weight 1/pi.
    `per_kv_head`: one sample per kv head that all its query heads use (each head's estimate
    is as unbiased as with its own sample; the heads' errors are then correlated)."""

    key_version = 2  # results changed meaning: indices drawn directly (another random stream)
    draws_random = True  # from the method's generator: `sparse.seed` is in its job key

    rate: float = 0.1
    per_kv_head: bool = False

    def __post_init__(self) -> None:
        check_fraction(self.rate, "rate")

    def select(self, ctx: Context, sel: Selection) -> Selection:
        n_rem = _remaining(ctx, sel)
        m = _at_most(ctx.budget(self.rate), n_rem)
        pi = _inclusion(m, n_rem)
        if not self.per_kv_head:
            idx, valid = draw_candidates(ctx, sel, m, ctx.budget_max(self.rate))
            return sel.add(idx, valid, log_weight(pi), ctx.kv)
        g = ctx.groups  # the selection so far is shared (checked at build): draw for one head of each group
        idx, valid = draw_candidates(ctx, sel.of_kv_heads(g), m[:, ::g], ctx.budget_max(self.rate))
        return sel.add(idx.repeat_interleave(g, 1), valid.repeat_interleave(g, 1), log_weight(pi),
                       ctx.kv, shared=True)


@dataclass
class AdaptiveSampling(Masker):
    """vAttention adaptive sampling (Desai et al., 2025, "vAttention: Verified Sparse
    Attention", https://arxiv.org/abs/2510.05688; reference code: sparse-attention-hub,
    `AdaptiveSamplingMasker`, https://github.com/xAlg-ai/sparse-attention-hub).

    Over the R candidates (keys not selected before, e.g. by sink/local/top-k), a base sample
    of b0 = max(2, floor(base_rate * R)) keys (an int base_rate: max(2, base_rate)) estimates
    the standard deviation sigma (n - 1 denominator) of the terms e_j = exp(s_j - c) of the
    softmax denominator. With D = sum_{selected} e_j + R mean(e_base) the estimated
    denominator, the budget that bounds the relative error of the sampled denominator by
    `epsilon` with probability 1 - `delta` by the CLT is, with the one-sided quantile the
    reference code uses (`norm.ppf(1 - delta)`):
        m = floor(clamp((Phi^-1(1 - delta) * R * sigma / (epsilon * D))^2, 1, R)),
    then clamped to [b0, R]. m candidates are sampled uniformly without replacement (the
    base sample is part of them), weight R / m (the reference samples with replacement).

    On CPU the base sample and then m - b0 of the other candidates are drawn
    (`draw_candidates`: few random numbers; its checks read the device, free there). On an
    accelerator both come from one ranking of the candidates by uniform random numbers, as no
    read but the sample's width: the base sample is the b0 highest, the sample the m highest
    - a uniform m-subset whose first b0 keys are a uniform b0-subset, the same distribution
    (another random stream, as a device's generator is anyway). The largest m is read: the
    call's one host sync (it sizes the sample).
    """

    key_version = 2  # results changed meaning: one-sided bound as the reference code
    draws_random = True  # from the method's generator: `sparse.seed` is in its job key

    base_rate: Size = 0.02
    epsilon: float = 0.1
    delta: float = 0.05

    def __post_init__(self) -> None:
        check_fraction(self.epsilon, "epsilon")
        check_range(self.delta, "delta", 0.0, 1.0, low_open=True)
        if self.delta >= 1.0:
            raise ConfigError(f"delta: expected a value in (0, 1), got {self.delta}")

    def base_size(self, n_rem: Tensor | int) -> Tensor | int:
        if isinstance(n_rem, int):  # the same float64 product and floor, on the host
            rate = self.base_rate
            b0 = max(2, math.floor(n_rem * rate)) if isinstance(rate, float) else max(2, int(rate))
            return min(b0, n_rem)
        if isinstance(self.base_rate, float):
            b0 = (n_rem.double() * self.base_rate).floor().long().clamp(min=2)
        else:
            b0 = n_rem.new_full((), max(2, int(self.base_rate)))
        return torch.minimum(b0, n_rem)

    def budget(self, sigma: Tensor, denom: Tensor, n_rem: Tensor | int,
               b0: Tensor | int = 1) -> Tensor:
        """The sample size m of the class docstring, clamped to [b0, R] (b0 >= 1 when R >= 1:
        the floor of the clamp to [1, R] then clamped to [b0, R])."""
        z = NormalDist().inv_cdf(1.0 - self.delta)  # Phi^-1, stdlib (no scipy)
        m = sigma / (self.epsilon * denom).clamp_min(1e-8)
        m = (m * (z * n_rem)).square_().nan_to_num_(1.0)
        # [b0, R] holds integers: clamping before the floor (a truncation of m >= 0) is the same
        m = m.clamp(b0, n_rem) if isinstance(n_rem, int) else m.clamp(min=b0).clamp(max=n_rem)
        return m.long()

    def select(self, ctx: Context, sel: Selection) -> Selection:
        n_rem = _remaining(ctx, sel)
        b0 = self.base_size(n_rem)
        if isinstance(self.base_rate, float):
            b0max = min(ctx.kv, max(2, math.floor(ctx.kv * self.base_rate)))
        else:
            b0max = min(ctx.kv, max(2, int(self.base_rate)))
        if reads_free(ctx.key.device):
            base, base_ok = draw_candidates(ctx, sel, b0, b0max)
            m = self.sample_size(ctx, sel, base, base_ok, n_rem, b0)
            extra = m - b0
            more, more_ok = draw_candidates(ctx, sel.add(base, base_ok, 0.0, ctx.kv), extra,
                                            int(extra.max()))
            idx, ok = torch.cat([base, more], -1), torch.cat([base_ok, more_ok], -1)
        else:
            b, h, q = sel.idx.shape[:3]
            rank = ctx.without(ctx.rand((b, h, q, ctx.kv)), sel, inplace=True)
            if isinstance(n_rem, int):  # b0 of every row's n_rem candidates: all valid
                base, base_ok = top_ranks(rank, b0), None
            else:
                base, base_ok = top_rows(rank, b0, b0max)
            m = self.sample_size(ctx, sel, base, base_ok, n_rem, b0)
            most = int(m.max())  # the one host read: the sample's width
            idx = top_ranks(rank, most)  # the base sample first (the b0 highest)
            positions = ctx.workspace.arange(most) if ctx.workspace is not None else torch.arange(
                most, device=idx.device)
            ok = positions < m.unsqueeze(-1)  # m <= R: every entry below m is a candidate
        return sel.add(idx, ok, log_weight(_inclusion(m, n_rem)), ctx.kv)

    def sample_size(self, ctx: Context, sel: Selection, base: Tensor, base_ok: Tensor | None,
                    n_rem: Tensor | int, b0: Tensor | int) -> Tensor:
        """m of the class docstring from the base sample (`base_ok` None: every entry valid),
        clamped to [b0, R]."""
        base_s = ctx.scores_at(base, clamped=True)  # keys < kv (top_rows)
        if base_ok is not None:
            base_s = base_s.masked_fill(~base_ok, NEG_INF)
        det_s = ctx.scores_at(sel.idx, clamped=sel.exact)
        if not sel.exact:  # padding entries
            det_s = det_s.masked_fill(~sel.valid, NEG_INF)
        c = torch.maximum(_max_or_neginf(base_s), _max_or_neginf(det_s)).nan_to_num(0.0, neginf=0.0)
        e = torch.exp(base_s - c)
        if base_ok is None and isinstance(b0, int) and b0 >= 2:  # one kernel for both
            var, mean = torch.var_mean(e, -1, correction=1)
        else:
            if base_ok is None:  # fewer than 2 keys
                base_ok = torch.ones_like(e, dtype=torch.bool)
            nb = base_ok.sum(-1).clamp(min=1)
            mean = e.sum(-1) / nb
            var = ((e - mean.unsqueeze(-1)) ** 2 * base_ok).sum(-1) / (nb - 1).clamp(min=1)
        denom = torch.exp(det_s - c).sum(-1)
        denom = denom.add_(mean, alpha=n_rem) if isinstance(n_rem, int) else denom + n_rem * mean
        return self.budget(var.sqrt().clamp_min(1e-8), denom, n_rem, b0)


def _max_or_neginf(x: Tensor) -> Tensor:
    """Row max [..., 1] of x [..., n], -inf for n = 0."""
    if x.shape[-1] == 0:
        return x.new_full((*x.shape[:-1], 1), NEG_INF)
    return x.amax(-1, keepdim=True)


__all__ = [
    "AdaptiveSampling", "Local", "OracleTopK", "OracleTopP", "PageStats", "Quest", "RandomSampling",
    "Sink",
]
