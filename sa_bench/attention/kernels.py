"""Attention over a selection of keys (`sparse_attention`): gathered index lists, a bias over
all keys, or one gather per kv head for a shared selection, whichever the cost model says
is cheaper."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sa_bench.attention.dense import softmax_with_sinks
from sa_bench.attention.gather import Workspace, flat_rows, key_rows, take_rows
from sa_bench.attention.ops import NEG_INF, float_matmul, reads_free
from sa_bench.attention.selection import Context, Selection
from sa_bench.lazy import F, torch

if TYPE_CHECKING:
    from torch import Tensor


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
    costs = ctx.costs
    if sel.dense is not None:  # as a bias over all keys, or as index lists when they are few
        # (how few is read from the device on CPU; an accelerator takes the bias: no sync)
        h, q = sel.idx.shape[1:3]
        if not reads_free(ctx.key.device) or h * q * int(sel.count().max()) * costs.value > (
                hk * kv + 5 * h * q * kv * 3 / d):
            return _bias_attention(ctx, value, sel, workspace)
        sel = sel.indexed()
    b, h, q, n = sel.idx.shape
    if sel.shared and ctx.groups > 1 and b * hk * q * n * (
            costs.score + costs.value) <= 2 * b * hk * ctx.kv:
        return shared_attention(ctx, value, sel)
    dtype = ctx.query.dtype
    rows = h * q * n
    score_cost = costs.score if costs.row_loop(ctx.key.device, b * h * q) else costs.score_batch
    if ctx.full_scores is None and rows * score_cost > hk * kv + 5 * h * q * kv / d:
        ctx.scores()
    if rows * costs.value <= hk * kv + 5 * h * q * kv * 3 / d:
        idx = sel.idx if sel.exact else sel.idx.clamp(max=kv - 1)
        s = ctx.scores_at(idx, workspace, clamped=True)
        if sel.exact:  # weights 1, no padding: no NaN row (n >= 1)
            p = softmax_with_sinks(s, ctx.sink_rows())
        else:
            p = softmax_with_sinks(s + sel.logw, ctx.sink_rows())
            if not sel.some_valid:  # a row of padding only: NaN
                p = p.nan_to_num_(0.0)
        v_rows, r0, r1 = key_rows(value)
        flat = ctx.flat_rows(idx, r0, r1)
        return value_gather(v_rows, flat, p).view(b, h, q, d).to(dtype)
    return _bias_attention(ctx, value, sel, workspace)


def value_gather(v_rows: Tensor, flat: Tensor, p: Tensor) -> Tensor:
    """sum_j p[..., j] v_rows[flat[..., j]] for flat, p [..., n] -> [prod(...), d] (values'
    dtype). CPU: `embedding_bag` (reads only the selected rows, no gathered copy). Elsewhere
    (CUDA): `index_select` into one [rows, n, d] tensor and a batched matmul with p - CUDA's
    embedding_bag kernel walks each bag's n rows serially in one thread block per bag (4096
    bags of ~13k rows at 128k keys), the batched matmul reads them in parallel."""
    n, d = flat.shape[-1], v_rows.shape[-1]
    weights = p.to(v_rows.dtype).reshape(-1, n)
    if reads_free(v_rows.device):
        return F.embedding_bag(flat.reshape(-1, n), v_rows, per_sample_weights=weights, mode="sum")
    rows = torch.index_select(v_rows, 0, flat.reshape(-1)).view(-1, n, d)
    return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


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
        # score), one kernel writing the buffer with the device's two constants
        top = torch.finfo(bias.dtype).max
        zero, low = workspace.cached(("bias", bias.dtype), lambda: (
            torch.zeros((), dtype=bias.dtype, device=bias.device),
            torch.full((), -top, dtype=bias.dtype, device=bias.device)))
        torch.where(sel.dense, zero, low, out=bias[..., :kv])
        bias[..., kv] = NEG_INF
    bias.scatter_(-1, sel.idx, sel.logw)
    p = softmax_with_sinks(bias[..., :kv].add_(scores), ctx.sink_rows())
    if not sel.some_valid:  # a row may hold no key (`some_valid`: one in every row)
        p = p.nan_to_num_(0.0)
        if sel.dense is not None:  # a row of -max everywhere comes out uniform: no output
            empty = sel.count() == 0
            if not reads_free(p.device) or bool(empty.any()):  # a read syncs an accelerator
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
    idx = sel.of_kv_heads(g).idx  # [b, Hk, q, n]
    if not sel.exact:
        idx = idx.clamp(max=kv - 1)

    def per_group(x: Tensor) -> Tensor:  # [b, H, q, f] -> [b * Hk * q, g, f]
        return x.unflatten(1, (hk, g)).transpose(2, 3).reshape(rows, g, x.shape[-1])

    k_rows, k0, k1 = key_rows(ctx.key)
    v_rows, v0, v1 = key_rows(value)
    k_flat = flat_rows(idx, 1, k0, k1, ctx.workspace).reshape(rows, n)
    v_flat = k_flat if (v0, v1) == (k0, k1) else flat_rows(idx, 1, v0, v1, ctx.workspace).reshape(rows, n)
    query = per_group(ctx.query).to(ctx.key.dtype)
    logw = per_group(sel.logw)
    sinks = ctx.sink_rows()
    if sinks is not None:
        sinks = per_group(sinks.expand(b, h, q, 1))  # [rows, g, 1]
    taken = sel.idx if sel.exact else sel.idx.clamp(max=kv - 1)
    known = None if ctx.full_scores is None else per_group(ctx.full_scores.gather(-1, taken))
    if ctx.costs.row_loop(ctx.key.device, rows):  # one kv head and query row at a time: gathers stay in cache
        out = torch.empty(rows, g, d, dtype=value.dtype)
        for r in range(rows):
            if known is None:
                s = float_matmul(query[r], take_rows(k_rows, k_flat[r]).t()).mul_(ctx.scaling)
            else:
                s = known[r]
            p = softmax_with_sinks(s + logw[r], None if sinks is None else sinks[r])
            p = p.nan_to_num_(0.0).to(value.dtype)
            torch.mm(p, take_rows(v_rows, v_flat[r]), out=out[r])
    else:
        if known is None:
            keys = torch.index_select(k_rows, 0, k_flat.reshape(-1)).view(rows, n, d)
            known = float_matmul(query, keys.transpose(1, 2)).mul_(ctx.scaling)
        if sel.exact:
            p = softmax_with_sinks(known, sinks).to(value.dtype)
        else:
            p = softmax_with_sinks(known + logw, sinks).nan_to_num_(0.0).to(value.dtype)
        out = torch.matmul(p, torch.index_select(v_rows, 0, v_flat.reshape(-1)).view(rows, n, d))
    return out.view(b, hk, q, g, d).transpose(2, 3).reshape(b, h, q, d).to(ctx.query.dtype)
