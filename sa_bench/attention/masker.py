"""The masker protocol and the steps maskers share: top-k by a score, uniform draws among the
candidates, range checks of their settings."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sa_bench.attention.ops import count_true, first_allowed, top_rows
from sa_bench.attention.selection import Context, KeyCache, Selection
from sa_bench.config import ConfigError, Size
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


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
        k, kmax = ctx.row_budget(self.heavy_size), ctx.budget_max(self.heavy_size)
        finite = candidates_known(ctx, sel)
        if self.per_kv_head:
            return self._select_per_kv_head(ctx, sel, k, kmax, finite)
        scores = self.score(ctx)
        if scores is not ctx.full_scores:
            idx, valid = top_rows(ctx.without(scores, sel, inplace=True), k, kmax, finite)
            return sel.add(idx, valid, 0.0, ctx.kv)
        # the shared exact scores, masked in place (no copy): keys a row may not see stay -inf,
        # the selected keys' scores are put back
        taken = sel.idx if sel.exact else sel.idx.clamp(max=ctx.kv - 1)
        kept = scores.gather(-1, taken)
        idx, valid = top_rows(ctx.without(scores, sel, inplace=True), k, kmax, finite)
        scores.scatter_(-1, taken, kept)
        return sel.add(idx, valid, 0.0, ctx.kv)

    def _select_per_kv_head(self, ctx: Context, sel: Selection, k: Tensor | int, kmax: int,
                            finite: int | None) -> Selection:
        g = ctx.groups  # the selection so far is shared (checked at build): one head per group
        scores = ctx.without(self.group_score(ctx), sel.of_kv_heads(g), inplace=True)
        idx, valid = top_rows(scores, k, kmax, finite)
        if valid is not None:
            valid = valid.repeat_interleave(g, 1)
        return sel.add(idx.repeat_interleave(g, 1), valid, 0.0, ctx.kv, shared=True)


def candidates_known(ctx: Context, sel: Selection) -> int | None:
    """The candidates of every row (keys it may see, not selected) when known without reading
    tensors (`Context.uniform_keys`, `Selection.known_count`), else None."""
    n, taken = ctx.uniform_keys, sel.known_count
    return None if n is None or taken is None else n - taken


def draw_candidates(ctx: Context, sel: Selection, m: Tensor | int, mmax: int) -> tuple[Tensor, Tensor]:
    """m[row] (<= the row's candidates, <= mmax) keys drawn uniformly without replacement
    from the candidates (keys the row may see, not in `sel`) -> (idx, valid) [b, H, q, n].

    Few draws next to the keys: i.i.d. uniform draws over the row's causal range, rejecting
    masked, selected and repeated keys (a kv-wide map of each key's first draw, no sort); the
    first m survivors in draw order are a uniform random m-subset. The result has one entry
    per draw (a few more than mmax), the rejected ones invalid. Enough draws are made for the
    worst case with a wide margin; if a row is still short (checked: one device sync), or when
    m is not small next to kv, kv random numbers per row are ranked instead (`ranked_draw`).
    """
    b, h, q = sel.idx.shape[:3]
    kv = ctx.kv
    if mmax == 0:
        empty = torch.zeros(b, h, q, 0, dtype=torch.long, device=ctx.key.device)
        return empty, empty.bool()
    need = mmax + sel.idx.shape[-1]  # distinct draws needed if every selected key is hit
    if 4 * need > kv:
        return ranked_draw(ctx, sel, m, mmax)
    draws = math.ceil(-kv * math.log1p(-need / kv) + 8 * math.sqrt(need) + 32)
    u = ctx.rand((b, h, q, draws), torch.float64)
    if ctx.uniform_keys is not None:  # every row sees keys [0, kv): the same numbers
        r = (u * kv).long()
    else:
        lo = first_allowed(ctx.allowed).unsqueeze(-1)  # [b, 1, q, 1]
        width = (ctx.positions[:, None] - lo + 1).clamp(min=1)
        r = lo + (u * width).long()  # [b, H, q, draws], each in the row's causal range
    order = torch.arange(draws, dtype=torch.int32, device=r.device).expand_as(r)
    first = torch.full((b, h, q, kv + 1), draws, dtype=torch.int32, device=r.device)
    first.scatter_(-1, sel.idx, -1)  # selected keys: never a first draw
    first.scatter_reduce_(-1, r, order, reduce="amin")  # earliest draw of each key
    ok = first.gather(-1, r) == order
    if not ctx.all_allowed:
        ok &= ctx.allowed.expand(b, h, q, kv).gather(-1, r)
    ok &= ok.cumsum(-1) <= (m if isinstance(m, int) else m.unsqueeze(-1))
    if bool((count_true(ok) < m).any()):  # one sync: a short row is never kept
        return ranked_draw(ctx, sel, m, mmax)
    return r, ok


def ranked_draw(ctx: Context, sel: Selection, m: Tensor | int, mmax: int) -> tuple[Tensor, Tensor]:
    """`draw_candidates` by ranking kv random numbers per row (the candidates' m lowest)."""
    b, h, q = sel.idx.shape[:3]
    keys = ctx.without(ctx.rand((b, h, q, ctx.kv)), sel, inplace=True)
    return top_rows(keys, m, mmax)


def top_ranks(rank: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k highest entries of each row of `rank` [..., kv] (float32 numbers
    in [0, 1) and -inf), highest first: a sorted topk of their bits, which order as the numbers
    do (int32: ~1.4x faster on CPU). Ties (2^-24 apart) go by the implementation, as
    `ranked_draw`'s."""
    return rank.view(torch.int32).topk(k, -1, sorted=True).indices


def check_fraction(value: float, name: str, low_open: bool = True) -> None:
    """Raise ConfigError('name: ...') unless value is in (0, 1] (or [0, 1] with low_open=False)."""
    if (value <= 0.0 if low_open else value < 0.0) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{name}: expected a value in {interval}, got {value}")
