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
gathers each head's selected key blocks and columns; never a [heads x n x n] tensor), kept as
the reference in tests. `attend_gather` is the CPU kernel: the (query block, head) pairs of
`rows // block` consecutive query blocks (64 rows by default: one query block of 64 or more,
four of 16) are the heads of PyTorch's fused CPU attention (the flash kernel, which returns the
log-sum-exp): their diagonal blocks in one causal call, the other selected blocks (whole-block
`index_select`) per group of pairs with similar block counts in one more call each, at most
8192 gathered keys a group (the gathered blocks stay in cache for the kernel: 8k tokens,
xattention, 1 thread, 2.8-3.05 CPU s with 131072, 2.0 with 8192 or 4096), and the columns for
each tile of 256 rows in one call whose batch is the heads and heads the query blocks (the
columns' keys expanded, not copied; one mask row per (head, query block) when the diagonal
block holds the in-block columns), merged through the log-sum-exp. Measured (4k tokens, 32/8
heads, d 128, 1 thread, loaded 2-core machine): block 16 at ~10% density 1.49 s with one query
block per call, 1.25 s with four (SDPA causal 2.1 s); larger batches (256 rows, 256 pairs per
call) were slower (2.2 s). `attend_flex` runs the blocks on PyTorch's FlexAttention with a
`BlockMask` (compiled: Triton on GPU, inductor's C++ backend on CPU) and the columns with the
reference code, merged through their log-sum-exp (torch 2.13 cannot return the log-sum-exp from
a CPU-compiled FlexAttention, so on CPU a pattern with columns runs on the reference).
`attend_flashinfer` (`kernel: flashinfer`, optional, CUDA, float16/bfloat16) runs the blocks on
FlashInfer's `BlockSparseAttentionWrapper` (API read from flashinfer-ai/flashinfer
flashinfer/sparse.py at commit 0090a5f8; version.txt of a stored neighbour commit: 0.7.0rc3):
its BSR pattern is shared by all heads, so it runs in two calls, R = C = `block`: the blocks
before the diagonal (a key block before the query block's grid block ends before its first
row, so no causal cut, whatever the chunk start) with no element mask, the heads flattened into
one (rows = (head, query block), columns = (kv head, key block); GQA without a copy per query
head); then each query block's diagonal block (the only one the causal cut crosses; rows past
the chunk and padded keys are either dropped or after every real row) for all heads at once
(FlashInfer's own GQA, the chunk's own keys), with one causal element mask per query block,
the heads that do not select it dropped (at most one block per (head, query block) computed for
nothing). The kernel's `causal=True` would also be exact there (query and key lengths equal per
row), but for block x group < 4 FlashInfer plans a decode kernel that takes no causal
argument, so the mask is explicit: [nq, block, block], one block expanded on our side, which
FlashInfer copies (8 MiB at 128k tokens, blocks of 64, instead of ~27 GB for a mask per
computed block at 32 heads and 10% density); its conversion loops over the nq rows in Python
(not measured). The calls' base-2 log-sum-exps are merged with each other and the columns as
flex's. The conversion (`flashinfer_bsr`, `flashinfer_diagonal`) and the code around the calls
are tested on CPU (the calls on a stand-in wrapper); FlashInfer itself has not run on a GPU in
this project so far, so `kernel: auto` still picks flex on CUDA and gather on CPU.

Columns as index lists or in a FlexAttention `mask_mod` (issue 19 item 3;
scripts/prefill_columns_kernel.py, docs/performance.md): with the columns folded into the
mask_mod, the block mask must hold every causal block that holds a selected column; a
vertical-slash pattern's columns (hundreds to thousands, spread over the prompt) leave almost
no block out (0.998 of the causal blocks at 4k and 8k), so FlexAttention computes the whole
causal triangle and evaluates the mask_mod on it: 2.7-3.2x dense SDPA on CPU, against
0.23-0.33x for the index lists (`attend_gather`), both exact. The columns therefore stay
index lists (MInference's way); on CUDA they still go through `attend_reference` beside the
flex blocks (not measured on a GPU here).

Measured on CPU (1 thread, 32 heads / 8 kv heads, d 128, float32, random blocks of 128 at 12%
density, one pass): 8k tokens SDPA causal 7.6-8.8 s (shared machine), reference 5.2 s (0.68x),
gather 2.0 s (0.22x). Earlier, at 4k and 22% density: SDPA 2.09 s, reference 2.16 s, compiled
flex 0.83 s after a 9-20 s compile per shape (dynamic=False: each chunk's key count
recompiles), so flex is not the CPU default.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sa_bench.attention.ops import merge_softmax
from sa_bench.config import ConfigError
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

Kernel = Literal["auto", "reference", "gather", "flex", "flashinfer"]


@dataclass
class Pattern:
    """What one prefill call computes (see module doc); `start` = position of the first query."""

    block: int
    start: int
    blocks: Tensor  # bool [b, H, n_query_blocks, n_key_blocks]
    # long [b, H, n_columns]: distinct key positions per head; a position >= the key count is
    # an unused slot (heads with fewer columns than others)
    columns: Tensor | None = None

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

    def layer_pattern(self, query: Tensor, key: Tensor, start: int, layer: int) -> Pattern:
        """`pattern` for decoder layer `layer` (methods with per-layer settings override it)."""
        return self.pattern(query, key, start)

    def prepare(self, model_config, key: str) -> None:
        """Check the method against the model before any job runs (ConfigError naming `key`)."""

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


def pad_rows(x: Tensor, before: int, after: int) -> Tensor:
    """x [..., n, d] with `before`/`after` zero rows added, contiguous (no copy when it is and
    there are none)."""
    return torch.nn.functional.pad(x, (0, 0, before, after)) if before or after else x.contiguous()


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
        in_block = pattern.blocks.gather(-1, (cols // block).clamp(max=nk - 1).unsqueeze(-2).expand(
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
        kernel = "gather" if query.device.type != "cuda" else "flex"
    if kernel == "flashinfer":
        return attend_flashinfer(pattern, query, key, value, scaling)
    if kernel == "gather":
        if query.device.type == "cpu" and _cpu_flash() is not None:
            return attend_gather(pattern, query, key, value, scaling)
        kernel = "reference"
    has_columns = pattern.columns is not None and pattern.columns.shape[-1] > 0
    if kernel == "flex" and not (has_columns and query.device.type == "cpu"):
        return attend_flex(pattern, query, key, value, scaling)
    return attend_reference(pattern, query, key, value, scaling)[0]


def attend_reference(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                     blocks: bool = True) -> tuple[Tensor, Tensor]:
    """Exact block-sparse attention, one query block at a time: each head's selected key
    blocks (with `blocks=False`, none: what a block kernel's output lacks) and its columns
    outside them are gathered, scored, masked causally and softmaxed. Returns (output
    [b, H, q, d], log-sum-exp [b, H, q]; -inf and a zero output for a row that computes no
    key)."""
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
            outside = ~sel.gather(-1, (cols // block).clamp(max=sel.shape[-1] - 1))
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
    from torch.nn.attention.flex_attention import AuxRequest

    b, h, q, d = query.shape
    kv = key.shape[2]
    pad = pattern.start - pattern.first_block * pattern.block  # rows before the chunk in its first block
    qp = torch.nn.functional.pad(query, (0, 0, pad, 0)) if pad else query
    offset = pattern.first_block * pattern.block  # absolute position of padded query row 0

    def causal(bi, hi, qi, ki):
        return qi + offset >= ki

    mask = flex_block_mask(pattern, qp.shape[2], kv, causal)
    gqa = h != key.shape[1]
    if pattern.columns is None or not pattern.columns.shape[-1]:
        out = compiled_flex()(qp, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
        return out[:, :, pad:]
    out, aux = compiled_flex()(qp, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa,
                                return_aux=AuxRequest(lse=True))  # not on CPU (torch 2.13)
    return _with_columns(pattern, out[:, :, pad:], aux.lse[:, :, pad:], query, key, value, scaling)


def _with_columns(pattern: Pattern, out: Tensor, lse: Tensor, query: Tensor, key: Tensor,
                  value: Tensor, scaling: float) -> Tensor:
    """The blocks' output and log-sum-exp (natural log) merged with the pattern's columns
    outside the blocks (`attend_reference`); `out` as is when there are none."""
    if pattern.columns is None or not pattern.columns.shape[-1]:
        return out
    c_out, c_lse = attend_reference(pattern, query, key, value, scaling, blocks=False)
    return merge_softmax(out.float().clone(), lse.float(), c_out.float(), c_lse)[0].to(query.dtype)


def flex_block_mask(pattern: Pattern, q_len: int, kv: int, mask_mod, partial: Tensor | None = None):
    """FlexAttention's `BlockMask` of the pattern's blocks for `q_len` query rows from the
    chunk's first grid block: a block wholly below the diagonal is full (no `mask_mod`), the
    others and `partial` (bool like `pattern.blocks`: blocks computed under `mask_mod` only,
    e.g. those holding a column) are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    block = pattern.block
    nq, nk = pattern.blocks.shape[-2:]
    dev = pattern.blocks.device
    qb = torch.arange(nq, device=dev)[:, None] + pattern.first_block
    kb = torch.arange(nk, device=dev)[None, :]
    full_ok = ((kb + 1) * block - 1 <= qb * block) & ((kb + 1) * block <= kv)  # no causal cut
    full = pattern.blocks & full_ok
    part = pattern.blocks & ~full_ok
    if partial is not None:
        part = part | (partial & ~full & (kb <= qb))

    def to_lists(sel: Tensor) -> tuple[Tensor, Tensor]:
        count = sel.sum(-1).to(torch.int32)
        idx = torch.sort(sel.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return count, idx

    return BlockMask.from_kv_blocks(*to_lists(part), *to_lists(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv))


@functools.cache
def flashinfer_available() -> bool:
    """Whether `import flashinfer` works (it is optional; CUDA only)."""
    try:
        import flashinfer  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # absent, or its CUDA libraries are
        return False
    return True


def check_kernel(kernel: str, cuda: bool, dtype: str, key: str) -> None:
    """ConfigError before the model loads when `kernel` cannot run on this job's devices
    (`dtype`: the `model.dtype` key)."""
    if kernel != "flashinfer":
        return
    if not cuda:
        raise ConfigError(f"{key}: flashinfer runs on CUDA only, and this job has no GPU; use "
                          "auto, gather or reference")
    if dtype == "float32":
        raise ConfigError(f"{key}: flashinfer needs model.dtype float16 or bfloat16, got float32")
    if not flashinfer_available():
        raise ConfigError(f"{key}: flashinfer is not installed (pip install flashinfer-python); "
                          "use auto or flex")


def flashinfer_bsr(blocks: Tensor, first: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """FlashInfer's BSR for one batch row's blocks [H, nq, nk] (query block i = grid block
    first + i) before the diagonal, which need no element mask (key block j < first + i ends
    before the query block's first grid row), in the layout `attend_flashinfer` runs: one head,
    the rows (head h, query block i) and columns (kv head h // g, key block j) flattened, so
    each head keeps its own blocks. Returns indptr [H * nq + 1] and indices [nnz] (int32,
    sorted per row), and diag, bool [H, nq]: the heads that compute query block i's diagonal
    block (the only one cut by causality; run by `flashinfer_diagonal`'s call)."""
    h, nq, nk = blocks.shape
    dev = blocks.device
    qi = torch.arange(nq, device=dev) + first
    sel = blocks & (torch.arange(nk, device=dev)[None, :] < qi[:, None])
    hi, _, j = sel.nonzero(as_tuple=True)  # row-major: by row (hi, i), then j ascending
    indptr = torch.zeros(h * nq + 1, dtype=torch.int32, device=dev)
    indptr[1:] = sel.sum(-1).flatten().cumsum(0)
    indices = ((hi // (h // kv_heads)) * nk + j).to(torch.int32)
    return indptr, indices, blocks[:, torch.arange(nq, device=dev), qi]


def flashinfer_diagonal(nq: int, block: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """The diagonal call's BSR over the chunk's own grid blocks (row i = query block i, column
    i = its diagonal key block; heads as FlashInfer heads, shared by all) and its element mask
    [nq, block, block]: causal (key c <= row r), one block expanded (FlashInfer copies it)."""
    indptr = torch.arange(nq + 1, dtype=torch.int32, device=device)
    tril = torch.ones(block, block, dtype=torch.bool, device=device).tril()
    return indptr, indptr[:-1], tril.expand(nq, block, block)


@functools.cache
def _flashinfer_wrapper(device):
    import flashinfer

    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)  # FlashInfer's advice
    return flashinfer.sparse.BlockSparseAttentionWrapper(workspace)


def attend_flashinfer(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor,
                      scaling: float) -> Tensor:
    """The blocks on FlashInfer's block-sparse kernel (float16/bfloat16, CUDA) in two calls:
    the blocks before the diagonal with no element mask (`flashinfer_bsr`), every query
    block's diagonal block with a causal mask (`flashinfer_diagonal`; the heads that do not
    select it dropped), then the columns outside the blocks by `attend_reference`, all merged
    through the log-sum-exp (FlashInfer's is base 2)."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("kernel flashinfer: needs float16 or bfloat16 (model.dtype), got "
                         f"{query.dtype}")
    b, h, q, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    block, first = pattern.block, pattern.first_block
    nq, nk = pattern.blocks.shape[-2:]
    dev, neg = query.device, float("-inf")
    front = pattern.start - first * block
    qp = pad_rows(query, front, nq * block - front - q)
    kp, vp = (pad_rows(t, 0, nk * block - kv) for t in (key, value))
    own = slice(first * block, (first + nq) * block)  # the diagonal blocks' keys
    wrapper = _flashinfer_wrapper(dev)
    d_indptr, d_indices, d_mask = flashinfer_diagonal(nq, block, dev)
    dtypes = {"q_data_type": query.dtype, "kv_data_type": key.dtype, "o_data_type": query.dtype}
    outs, lses = [], []
    for bi in range(b):
        indptr, indices, diag = flashinfer_bsr(pattern.blocks[bi], first, hk)
        out = torch.zeros(h, nq * block, d, device=dev)
        lse = torch.full((h, nq * block), neg, device=dev)
        if len(indices):  # a row without a block: whatever the kernel leaves -> 0 and -inf
            wrapper.plan(indptr, indices, h * nq * block, hk * nk * block, block, block, 1, 1, d,
                         sm_scale=scaling, **dtypes)
            o, l1 = wrapper.run(qp[bi].reshape(-1, 1, d), kp[bi].reshape(-1, 1, d),
                                vp[bi].reshape(-1, 1, d), return_lse=True)
            has = (indptr[1:] > indptr[:-1]).view(h, nq).repeat_interleave(block, -1)
            out = o.view(h, nq * block, d).float().masked_fill(~has[..., None], 0.0)
            lse = (l1.view(h, nq * block).float() * math.log(2)).masked_fill(~has, neg)
        if bool(diag.any()):
            wrapper.plan(d_indptr, d_indices, nq * block, nq * block, block, block, h, hk, d,
                         mask=d_mask, sm_scale=scaling, **dtypes)
            o, l2 = wrapper.run(qp[bi].transpose(0, 1).contiguous(),
                                kp[bi, :, own].transpose(0, 1).contiguous(),
                                vp[bi, :, own].transpose(0, 1).contiguous(), return_lse=True)
            keep = diag.repeat_interleave(block, -1)  # [H, nq * block]
            o2 = o.transpose(0, 1).float().masked_fill(~keep[..., None], 0.0)
            l2 = (l2.transpose(0, 1).float() * math.log(2)).masked_fill(~keep, neg)
            out, lse = merge_softmax(out, lse, o2, l2)
        outs.append(out)
        lses.append(lse)
    out = torch.stack(outs)[:, :, front:front + q].to(query.dtype)
    lse = torch.stack(lses)[:, :, front:front + q]
    return _with_columns(pattern, out, lse, query, key, value, scaling)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend_gather(pattern: Pattern, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                  slack: float = 0.8, max_group: int = 32, rows: int = 64,
                  key_rows: int = 1 << 13, column_rows: int = 256) -> Tensor:
    """Exact block-sparse attention on the CPU's fused (flash) SDPA kernel. The query rows are
    padded to whole grid blocks; the (query block, head) pairs of `rows // block` consecutive
    query blocks are the "heads" of one call each (blocks of 16 cost a few calls per 64 rows,
    not a few per block): the diagonal blocks of them all in one causal call, then the other
    selected key blocks per group of pairs with similar block counts (sorted by count; a group
    pads to its largest count with masked blocks, a pair joins while its count is >= `slack` x
    the group's, the group holds at most `max_group` pairs and `key_rows` gathered keys),
    gathered by `index_select` of whole key blocks. The columns outside the blocks run once per
    `column_rows` rows for every head in one call (`_columns`), each head's columns in
    ascending order so that a tile reads only those before its end (half of uniformly spread
    columns, on average: at 8k tokens, ~10% density, 1 thread, vertical-slash's kernel went
    from 3.37 to 2.30 CPU s; with one mask row per (head, query block) instead of a [heads,
    rows, columns] mask, 2.49 -> 1.70). The parts are merged through their log-sum-exp;
    blocks need a per-key mask row only ([pairs, 1, keys])."""
    flash = _cpu_flash()
    b, h, q, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    g = h // hk
    block, start, first = pattern.block, pattern.start, pattern.first_block
    dev, dtype = query.device, query.dtype
    nq, nk = pattern.blocks.shape[-2:]
    front = start - first * block
    qg = pad_rows(query, front, nq * block - front - q).view(b, h, nq, block, d)
    pad = nk * block - kv
    kb = pad_rows(key, 0, pad).view(b * hk * nk, block, d)
    vb = pad_rows(value, 0, pad).view(b * hk * nk, block, d)
    qi = torch.arange(nq, device=dev)
    diag_kb = qi + first
    sel = pattern.blocks & (torch.arange(nk, device=dev)[None, :] <= diag_kb[:, None])
    diag = sel[..., qi, diag_kb]  # [b, H, nq]
    off = sel & (torch.arange(nk, device=dev)[None, :] < diag_kb[:, None])
    counts = off.sum(-1)  # [b, H, nq]
    order_all = torch.sort(off.to(torch.int8), dim=-1, descending=True, stable=True).indices
    has_cols = pattern.columns is not None and pattern.columns.shape[-1] > 0
    heads_kv = torch.arange(h, device=dev) // g
    if has_cols:  # ascending per head: a tile reads only the columns before its end
        cols = pattern.columns.sort(-1).values  # a slot >= kv stays masked: it is > every row
        nc = cols.shape[-1]
        safe = cols.clamp(max=kv - 1)
        kc = key[torch.arange(b, device=dev)[:, None, None], heads_kv[None, :, None], safe]  # [b, H, nc, d]
        vc = value[torch.arange(b, device=dev)[:, None, None], heads_kv[None, :, None], safe]
        col_in = sel.gather(-1, (safe // block).unsqueeze(-2).expand(b, h, nq, nc))  # [b, H, nq, nc]
    neg = float("-inf")
    causal = torch.zeros(block, block, dtype=dtype, device=dev).masked_fill_(
        torch.ones(block, block, dtype=torch.bool, device=dev).triu(1), neg)
    # the columns' mask: a bool -> float copy times the dtype's lowest finite value (0 * -inf
    # would be nan): a masked score underflows to a zero weight; a row with no column is
    # set to lse -inf after the call
    low = torch.finfo(dtype).min
    step = max(1, rows // block)
    out = torch.empty(b, h, nq, block, d, dtype=dtype, device=dev)
    tile = max(step, (column_rows // block) // step * step)  # query blocks per columns pass
    for t0 in range(0, nq, tile):
        t1 = min(nq, t0 + tile)
        for bi in range(b):
            if has_cols:
                c_o, c_l = _columns(flash, qg[bi, :, t0:t1], kc[bi], vc[bi], cols[bi], col_in[bi, :, t0:t1],
                                    (first + t0) * block, scaling, low)
            for i0 in range(t0, t1, step):
                i1 = min(t1, i0 + step)
                acc_o, acc_l = _gather_blocks(flash, qg, kb, vb, bi, i0, i1, first, nk, hk, heads_kv, diag,
                                              counts, order_all, causal, scaling, slack, max_group, key_rows)
                if has_cols:
                    o2 = c_o[:, i0 - t0:i1 - t0].transpose(0, 1).reshape(-1, block, d)
                    l2 = c_l[:, i0 - t0:i1 - t0].transpose(0, 1).reshape(-1, block)
                    acc_o, acc_l = merge_softmax(acc_o, acc_l, o2, l2)
                acc_o = acc_o.masked_fill(torch.isneginf(acc_l)[..., None], 0.0)
                out[bi, :, i0:i1] = acc_o.view(i1 - i0, h, block, d).transpose(0, 1).to(dtype)
    return out.view(b, h, nq * block, d)[:, :, front:front + q]


def _columns(flash, qs: Tensor, kc: Tensor, vc: Tensor, cols: Tensor, col_in: Tensor, p0: int, scaling: float, low: float) -> tuple[Tensor, Tensor]:
    """`attend_gather`'s columns part for the query blocks qs [H, n, block, d] (first row at
    position p0) of one batch row: each head's sorted columns cols [H, nc] (keys kc, vc [H, nc,
    d]) outside the blocks (col_in [H, n, nc]: the column's key block is selected), in one call
    whose "batch" is the heads and "heads" the query blocks (keys expanded, not copied).
    A column before a query block's first row is read by all of its rows, one in its rows by
    the rows at or after it, which are inside the block's own diagonal block: when every such
    column is in a selected block (vertical-slash's nearest diagonals always select the
    diagonal block) the mask is one row per (head, query block), [H, n, 1, m], otherwise
    [H, n, block, m].
    Returns (output [H, n, block, d] float32, lse [H, n, block])."""
    h, n, block, d = qs.shape
    dev, dtype = qs.device, qs.dtype
    end = p0 + n * block  # the columns at or after it are after every row
    m = max(1, int(torch.searchsorted(cols, torch.full((h, 1), end, device=dev)).max()))
    c = cols[:, None, :m]  # [H, 1, m]
    starts = p0 + block * torch.arange(n, device=dev)[None, :, None]  # [1, n, 1]
    inside = col_in[..., :m]
    within = (c >= starts) & (c < starts + block) & ~inside  # read by some rows of the block only
    if bool(within.any()):
        rowpos = starts[..., None] + torch.arange(block, device=dev)[:, None]  # [1, n, block, 1]
        bad = inside[:, :, None, :] | (c[:, :, None, :] > rowpos)  # [H, n, block, m]
        none = bad.all(-1)
    else:
        bad = (inside | (c >= starts))[:, :, None, :]  # [H, n, 1, m]
        none = bad.all(-1).expand(h, n, block)
    o, lse = flash(qs, kc[:, None, :m].expand(h, n, m, d), vc[:, None, :m].expand(h, n, m, d), 0.0, False,
                   attn_mask=bad.to(dtype).mul_(low), scale=scaling)
    return o.float(), lse.masked_fill(none, float("-inf"))  # a row with no column: lse 0 from the kernel


def _gather_blocks(flash, qg, kb, vb, bi, i0, i1, first, nk, hk, heads_kv, diag, counts, order_all,
                   causal, scaling, slack, max_group, key_rows) -> tuple[Tensor, Tensor]:
    """`attend_gather`'s block part for query blocks i0 .. i1 - 1 of batch row bi: (output
    [items, block, d] float32, lse [items, block]), item t = query block i0 + t // H, head t % H."""
    h, block, d = qg.shape[1], qg.shape[3], qg.shape[4]
    dev, dtype = qg.device, qg.dtype
    neg = float("-inf")
    n_items = (i1 - i0) * h
    item_q = torch.arange(i0, i1, device=dev).repeat_interleave(h)
    item_h = torch.arange(h, device=dev).repeat(i1 - i0)
    qs = qg[bi, :, i0:i1].transpose(0, 1).reshape(n_items, block, d)
    base = (bi * hk + heads_kv[item_h]) * nk  # [items]
    flat = base + item_q + first
    acc_o, acc_l = flash(qs[None], kb.index_select(0, flat)[None], vb.index_select(0, flat)[None],
                         0.0, False, attn_mask=causal[None, None], scale=scaling)
    acc_o, acc_l = acc_o[0].float(), acc_l[0]
    d_ok = diag[bi, :, i0:i1].transpose(0, 1).reshape(-1)
    if not bool(d_ok.all()):
        acc_l = acc_l.masked_fill(~d_ok[:, None], neg)
    cnt_t = counts[bi, :, i0:i1].transpose(0, 1).reshape(-1)  # [items]
    cnt = cnt_t.tolist()
    by_count = sorted(range(n_items), key=lambda x: -cnt[x])
    j = 0
    while j < n_items and cnt[by_count[j]] > 0:
        m = cnt[by_count[j]]
        e = j + 1
        while (e < n_items and e - j < max_group and (e - j + 1) * m * block <= key_rows
               and cnt[by_count[e]] >= slack * m and cnt[by_count[e]] > 0):
            e += 1
        its = torch.tensor(by_count[j:e], device=dev)
        n_g = e - j
        idx = order_all[bi, item_h[its], item_q[its], :m]  # [G, m]
        flat = (base[its][:, None] + idx).reshape(-1)
        ks = kb.index_select(0, flat).view(n_g, m * block, d)
        vs = vb.index_select(0, flat).view(n_g, m * block, d)
        short = torch.arange(m, device=dev)[None, :] >= cnt_t[its][:, None]
        mask = None
        if bool(short.any()):
            mask = torch.zeros(n_g, m, block, dtype=dtype, device=dev).masked_fill_(
                short[..., None], neg).view(1, n_g, 1, m * block)
        o, lse = flash(qs[its][None], ks[None], vs[None], 0.0, False, attn_mask=mask, scale=scaling)
        acc_o[its], acc_l[its] = merge_softmax(acc_o[its], acc_l[its], o[0].float(), lse[0])
        j = e
    return acc_o, acc_l


def _cpu_flash():
    """PyTorch's fused CPU attention that also returns the log-sum-exp (None if absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
