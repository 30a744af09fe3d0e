"""Sparse prefill: which (query block, key block) pairs a prefill pass computes.

Design
------
A prefill method (`PrefillMethod`, one small dataclass per method in `prefill_methods.py`)
holds its parameters and one function, `pattern(query, key, start)`: given a prefill chunk's
queries [b, H, q, d] (absolute positions start .. start + q - 1, start = kv - q) and every key
so far [b, Hk, kv, d] (GQA: H = g * Hk, query head h reads kv head h // g), it returns a
`Pattern`: a square grid of `block` positions, `blocks[b, H, i, j]` true when the rows of
query block i compute key block j, plus optional `columns` (key positions every row of the
head computes). Causality always applies on top: row p computes key k only if k <= p.
Diagonals ("slash" lines) are not a third kind: a method turns them into the key blocks that
hold them, as MInference's kernel computes them (whole 64-key ranges, causal inside).

Query blocks sit on the absolute grid (block i of a chunk is grid block start // block + i),
so a chunked prefill computes the same blocks as one pass would with the same pattern.

Estimation sees only the chunk's queries and the keys so far: with chunked prefill
(`model.prefill_chunk`) each chunk's pattern is estimated from that chunk's queries against
every key before its end (as XAttention's `chunk_size`), never from a later query; with
`prefill_chunk: null` from the whole prompt, as the papers do. The method is the optional
`prefill:` section of the `sparse` config (`_target_` like maskers), so it combines with decode
maskers in one config; `sparse.phase: question` makes the question tokens use it too.

Kernels: `attend_reference` is the exact pure-PyTorch path (a loop over query blocks that
gathers each head's selected key blocks and columns; never a [heads x n x n] tensor), used on
CPU and in tests. `attend_flex` runs the blocks on PyTorch's FlexAttention with a `BlockMask`
(compiled: Triton on GPU, inductor's C++ backend on CPU) and the columns with the reference
code, merged through their log-sum-exp (torch 2.13 cannot return the log-sum-exp from a
CPU-compiled FlexAttention, so on CPU a pattern with columns runs on the reference). `kernel:
auto` picks flex on CUDA, the reference on
CPU. Measured on CPU (1 thread, 4k tokens, 32 heads / 8 kv heads, d 128, blocks of 128 at 22%
density): SDPA causal 2.09 s, reference 2.16 s, compiled flex
0.83 s after a 9-20 s compile per shape (dynamic=False: each chunk's key count recompiles).
`kernel: flex` is therefore the faster choice on CPU for long prompts without columns; `auto`
keeps the reference there so short jobs and tests do not pay the compile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sa_bench.config import ConfigError
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

Kernel = Literal["auto", "reference", "flex"]


@dataclass
class Pattern:
    """What one prefill call computes (see module doc); `start` = position of the first query."""

    block: int
    start: int
    blocks: Tensor  # bool [b, H, n_query_blocks, n_key_blocks]
    columns: Tensor | None = None  # long [b, H, n_columns], distinct key positions per head

    @property
    def first_block(self) -> int:
        return self.start // self.block


class PrefillMethod:
    """Base of prefill methods: a dataclass of YAML keys plus `pattern`.

    Subclasses set `block` (the grid) and implement `pattern(query, key, start) -> Pattern`.
    """

    block: int
    kernel: Kernel

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:  # pragma: no cover
        raise NotImplementedError

    def _check_block(self) -> None:
        if self.block < 1:
            raise ConfigError(f"block: expected an int >= 1, got {self.block}")


# --- pattern helpers ------------------------------------------------------------------------


def n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def causal_blocks(start: int, kv: int, block: int, device) -> Tensor:
    """bool [nq, nk]: the grid blocks that hold at least one causal pair of the chunk."""
    first = start // block
    qb = torch.arange(first, n_blocks(kv, block), device=device)
    kb = torch.arange(n_blocks(kv, block), device=device)
    return kb[None, :] <= qb[:, None]


def grouped_scores(query: Tensor, key: Tensor) -> Tensor:
    """query [b, H, r, d] @ key [b, Hk, n, d]^T -> [b, H, r, n] float32, without copying keys."""
    b, h, r, d = query.shape
    hk = key.shape[1]
    s = torch.matmul(query.reshape(b, hk, (h // hk) * r, d).float(), key.float().transpose(-1, -2))
    return s.view(b, h, r, key.shape[2])


# --- density --------------------------------------------------------------------------------


def causal_pairs(start: int, kv: int) -> int:
    """Causal (query, key) pairs of a chunk of rows start .. kv - 1 over kv keys."""
    return (start + 1 + kv) * (kv - start) // 2


def computed_pairs(pattern: Pattern, kv: int) -> Tensor:
    """float64 [b, H]: the causal (query, key) pairs the pattern computes, per head."""
    block, start = pattern.block, pattern.start
    dev = pattern.blocks.device
    nq, nk = pattern.blocks.shape[-2:]
    first = pattern.first_block
    pos = torch.arange(start, kv, device=dev)  # query rows
    k0 = torch.arange(nk, device=dev) * block
    k1 = (k0 + block).clamp(max=kv)
    per_row = ((pos[:, None] + 1).minimum(k1[None, :]) - k0[None, :]).clamp(min=0)  # [q, nk]
    counts = torch.zeros(nq, nk, dtype=torch.float64, device=dev)
    counts.index_add_(0, pos // block - first, per_row.double())
    total = (pattern.blocks.double() * counts).sum((-1, -2))
    if pattern.columns is not None and pattern.columns.shape[-1]:
        cols = pattern.columns
        in_block = pattern.blocks.gather(-1, (cols // block).unsqueeze(-2).expand(
            *cols.shape[:2], nq, cols.shape[-1]))  # [b, H, nq, nc]
        q0 = (torch.arange(nq, device=dev) + first) * block
        r0, r1 = q0.clamp(min=start), (q0 + block).clamp(max=kv)
        rows = (r1[:, None] - r0[:, None].maximum(cols.unsqueeze(-2))).clamp(min=0)  # [b, H, nq, nc]
        total = total + (rows.double() * (~in_block).double()).sum((-1, -2))
    return total


# --- kernels --------------------------------------------------------------------------------


def attend(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor, scaling: float,
           kernel: Kernel = "auto") -> Tensor:
    """Attention of the chunk's queries under `pattern` -> [b, H, q, d]."""
    if kernel == "auto":
        kernel = "flex" if query.device.type == "cuda" else "reference"
    has_columns = pattern.columns is not None and pattern.columns.shape[-1] > 0
    if kernel == "flex" and not (has_columns and query.device.type == "cpu"):
        return attend_flex(pattern, query, key, value, scaling)
    return attend_reference(pattern, query, key, value, scaling)[0]


def attend_reference(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                     blocks: bool = True) -> tuple[Tensor, Tensor]:
    """Exact block-sparse attention, one query block at a time: each head's selected key
    blocks (or, with `blocks=False`, none) and its columns outside them are gathered, scored,
    masked causally and softmaxed. Returns (output [b, H, q, d], log-sum-exp [b, H, q]; -inf
    and a zero output for a row that computes no key)."""
    b, h, q, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    block, start, first = pattern.block, pattern.start, pattern.first_block
    dev = query.device
    k_rows, v_rows = key.reshape(-1, d), value.reshape(-1, d)
    base = ((torch.arange(b, device=dev)[:, None] * hk
             + torch.arange(h, device=dev)[None, :] // (h // hk)) * kv)[..., None]  # [b, H, 1]
    out = torch.zeros(b, h, q, d, dtype=query.dtype, device=dev)
    lse = torch.full((b, h, q), float("-inf"), device=dev)
    offsets = torch.arange(block, device=dev)
    for i in range(pattern.blocks.shape[-2]):
        p0 = max(start, (first + i) * block)
        p1 = min(kv, (first + i + 1) * block)
        sel = pattern.blocks[:, :, i]  # [b, H, nk]
        parts, valid = [], []
        if blocks:
            m = int(sel.sum(-1).max())
            if m:
                order = torch.sort(sel.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :m]
                ok = sel.gather(-1, order)
                pos = (order[..., None] * block + offsets).flatten(-2)  # [b, H, m * block]
                parts.append(pos)
                valid.append(ok.repeat_interleave(block, -1) & (pos < p1))
        if pattern.columns is not None and pattern.columns.shape[-1]:
            cols = pattern.columns
            outside = ~sel.gather(-1, cols // block) if blocks else torch.ones_like(cols, dtype=torch.bool)
            parts.append(cols)
            valid.append(outside & (cols < p1))
        if not parts:
            continue
        pos, ok = torch.cat(parts, -1), torch.cat(valid, -1)
        pos = pos.clamp(max=kv - 1)
        flat = (base + pos).reshape(-1)
        n = pos.shape[-1]
        ks = k_rows.index_select(0, flat).view(b, h, n, d)
        vs = v_rows.index_select(0, flat).view(b, h, n, d)
        rows = torch.arange(p0, p1, device=dev)
        s = torch.matmul(query[:, :, p0 - start:p1 - start].float(), ks.float().transpose(-1, -2)) * scaling
        allowed = ok[:, :, None, :] & (pos[:, :, None, :] <= rows[None, None, :, None])
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, -1)  # [b, H, r]
        p = torch.exp(s - row_lse.unsqueeze(-1)).nan_to_num_(0.0)
        out[:, :, p0 - start:p1 - start] = torch.matmul(p, vs.float()).to(query.dtype)
        lse[:, :, p0 - start:p1 - start] = row_lse
    return out, lse


def attend_flex(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
    """The blocks on FlexAttention with a `BlockMask` (compiled), the columns outside them by
    `attend_reference`, the two merged through their log-sum-exp."""
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask

    b, h, q, d = query.shape
    kv = key.shape[2]
    block, start = pattern.block, pattern.start
    pad = start - pattern.first_block * block  # query rows before the chunk in its first block
    qp = torch.nn.functional.pad(query, (0, 0, pad, 0)) if pad else query
    nq, nk = pattern.blocks.shape[-2:]
    offset = pattern.first_block * block  # absolute position of padded query row 0
    qb = torch.arange(nq, device=query.device)[:, None] + pattern.first_block
    kb = torch.arange(nk, device=query.device)[None, :]
    full_ok = ((kb + 1) * block - 1 <= qb * block) & ((kb + 1) * block <= kv)  # no causal cut
    full = pattern.blocks & full_ok
    partial = pattern.blocks & ~full_ok

    def to_lists(sel: Tensor) -> tuple[Tensor, Tensor]:
        count = sel.sum(-1).to(torch.int32)
        idx = torch.sort(sel.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return count, idx

    def causal(bi, hi, qi, ki):
        return qi + offset >= ki

    mask = BlockMask.from_kv_blocks(*to_lists(partial), *to_lists(full), BLOCK_SIZE=block,
                                    mask_mod=causal, seq_lengths=(qp.shape[2], kv))
    gqa = h != key.shape[1]
    if pattern.columns is None or not pattern.columns.shape[-1]:
        out = _compiled_flex()(qp, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
        return out[:, :, pad:]
    out, aux = _compiled_flex()(qp, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa,
                                return_aux=AuxRequest(lse=True))  # not on CPU (torch 2.13)
    out, lse = out[:, :, pad:], aux.lse[:, :, pad:]
    c_out, c_lse = attend_reference(pattern, query, key, value, scaling, blocks=False)
    both = torch.logaddexp(lse.float(), c_lse)
    w1 = torch.exp(lse.float() - both).nan_to_num_(0.0)[..., None]
    w2 = torch.exp(c_lse - both).nan_to_num_(0.0)[..., None]
    return (out.float() * w1 + c_out.float() * w2).to(query.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
