"""One sparse attention call: the maskers applied to blocks of query rows, then the kernel;
and the decode calls whose keys are a few ranges known without tensors (sink, local)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sa_bench.attention.gather import CPU_GATHER, GatherCosts, Workspace
from sa_bench.attention.kernels import sparse_attention
from sa_bench.attention.ops import allowed_from_mask
from sa_bench.attention.selection import Context, Selection
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


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
                  workspace: Workspace, budget_bytes: int,
                  costs: GatherCosts = CPU_GATHER,
                  sinks: Tensor | None = None) -> tuple[Tensor, Tensor | float]:
    """Sparse attention of every query row, the rows in blocks (`row_blocks`) so that no
    per-call tensor outgrows `budget_bytes` (a question of thousands of rows over 128k keys).
    A block of rows sees the keys up to its last row's position only (causal masks; a mask
    that lets a row see a later key is refused). Returns (output [b, H, q, d], the sum over
    rows and heads of the attended fraction of each row's keys times the third value, a
    float: the sum a float when known without reading the selection, else a tensor on the
    device, scaled by the meter that adds it up - no launch per layer). `costs`: see
    `GatherCosts`.
    `sinks`: learned per-head sink logits [H] that enter every row's softmax (GPT-OSS)."""
    b, h, q, _ = query.shape
    kv = key.shape[2]
    outs, density, scale = [], 0.0, 1.0
    blocks = row_blocks(b, h, q, kv, budget_bytes)
    for r0, r1 in blocks:
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
        if mask is None and r1 - r0 == 1:  # one row seeing every key: made once per device
            allowed = workspace.true().expand(b, 1, 1, end)
        else:
            allowed = allowed_from_mask(mask, b, r1 - r0, end, query.device)
        ctx = Context(query[:, :, r0:r1], k, scaling, layer, allowed, generator, costs=costs,
                      value=v, sinks=sinks, causal=mask is None, workspace=workspace)
        spans, ranged = decode_spans(maskers, r1 - r0, end, mask)
        sel = Selection.of_range_spans(spans, b, h, r1 - r0, workspace)
        for masker in list(maskers)[ranged:]:
            sel = masker.select(ctx, sel.indexed())
        outs.append(sparse_attention(ctx, v, sel, workspace))
        n, known = ctx.uniform_keys, sel.known_count
        if n is not None and known is not None:  # no tensor read or made
            term = b * h * (r1 - r0) * min(known, n) / max(n, 1)
        elif n is not None:  # one row: the valid entries counted, n divides (later if alone)
            term = sel.valid.sum() if sel.dense is None else sel.valid.sum() + sel.dense.sum()
            if len(blocks) == 1:
                scale = 1.0 / max(n, 1)
            else:  # the last block of a question's rows
                term = term * (1.0 / max(n, 1))
        else:
            term = (sel.count().float() / ctx.n_keys.clamp(min=1).float()).sum()
        density = term if isinstance(density, float) and density == 0.0 else density + term
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)), density, scale
