"""Sparse prefill methods with their authors' defaults (see `sa_bench.attention.prefill`).

Each is a dataclass of its YAML keys and a `pattern` function; every estimate reads the
chunk's queries and the keys so far only. References (read, not copied):
MInference microsoft/MInference@fb56c917f618e8645f1cfc37535afd7424d78f0d,
sparse-frontier PiotrNawrot/sparse-frontier@31d86c170248865183d6569c491d47f71cdd9d53,
XAttention mit-han-lab/x-attention@e37988770b9d1bebd489eba011d615f35587ba08,
FlexPrefill bytedance/FlexPrefill@a24b27bf117fd6ad4ba34b0db82c598e7786fd59.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sa_bench.attention.files import method_file, model_shapes
from sa_bench.attention.prefill import (
    Kernel,
    Pattern,
    PrefillMethod,
    causal_blocks,
    grouped_scores,
    n_blocks,
    pad_rows,
)
from sa_bench.config import ConfigError, check_range
from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def last_rows_sums(query: Tensor, key: Tensor, r: int, tile: int = 512) -> tuple[Tensor, Tensor]:
    """The last r queries' causal softmax (scale 1/sqrt(d), float32) summed per key column and
    per diagonal: ([b, H, kv], [b, H, kv], index t of the second = offset kv - 1 - t).

    One kv head at a time (its g query heads' r rows together), the scores written in `tile`
    keys at a time into one buffer and, while in cache, exponentiated against the tile's row
    maximum; the tiles' maxima and sums then give each row's factor (one more pass), and the
    column and diagonal sums read the buffer once each: each buffer row starts with r - 1
    zeros, so that the diagonals are columns of a strided view (32k keys, 1 thread: a handful
    of passes over [g, r, kv] instead of one new tensor per softmax step)."""
    b, h, _, d = query.shape
    hk, kv = key.shape[1], key.shape[2]
    g = h // hk
    dev = query.device
    scale = d ** -0.5
    w = kv + r - 1
    buf = torch.zeros(g, r, w, device=dev)
    flat = buf.view(g * r, w)[:, r - 1:]  # the scores, [g * r, kv]
    pos = torch.arange(kv - r, kv, device=dev)  # the rows' positions
    keys = torch.arange(kv, device=dev)
    low = torch.finfo(torch.float32).min  # a tile no row of which sees a key: max = low, not -inf
    vertical = torch.empty(b, h, kv, device=dev)
    slash = torch.empty(b, h, kv, device=dev)
    tile = tile if dev.type == "cpu" else kv  # off the CPU no cache to fit: one tile
    tiles = [(k0, min(kv, k0 + tile)) for k0 in range(0, kv, tile)]
    for bi in range(b):
        for j in range(hk):
            rows = query[bi, j * g:(j + 1) * g, -r:].float().reshape(g * r, d)
            maxes, sums = [], []
            for k0, k1 in tiles:
                s = flat[:, k0:k1]
                torch.mm(rows, key[bi, j, k0:k1].float().T, out=s)
                lo = max(k0, kv - r + 1)  # row i sees the keys up to kv - r + i
                if lo < k1:
                    buf[:, :, r - 1 + lo:r - 1 + k1].masked_fill_(keys[lo:k1] > pos[:, None], float("-inf"))
                m = s.amax(-1, keepdim=True).clamp_(min=low)
                s.sub_(m).mul_(scale).exp_()
                maxes.append(m)
                sums.append(s.sum(-1, keepdim=True))
            m = torch.cat(maxes, -1)  # [g * r, tiles]
            f = ((m - m.amax(-1, keepdim=True)) * scale).exp_()
            f = f / (f * torch.cat(sums, -1)).sum(-1, keepdim=True)
            for t, (k0, k1) in enumerate(tiles):
                flat[:, k0:k1].mul_(f[:, t:t + 1])
            vertical[bi, j * g:(j + 1) * g] = buf[:, :, r - 1:].sum(-2)
            # row i's score for key k sits at column k + r - 1 of its buffer row: the diagonal
            # t = k + r - 1 - i is column t of a view whose rows step w + 1
            slash[bi, j * g:(j + 1) * g] = buf.as_strided((g, r, kv), (r * w, w + 1, 1)).sum(-2)
    return vertical, slash


@dataclass
class VerticalSlash(PrefillMethod):
    """MInference's vertical-slash pattern (https://arxiv.org/abs/2407.02490) with
    sparse-frontier's settings (configs/attention/vertical_and_slash.yaml,
    `vertical_and_slash_kernel`): the last `last_q` queries of the chunk attend (causally) to
    every key; the column sums of their softmax choose `vertical_size` key columns (the first
    `keep_first` always), the sums along each diagonal choose `slash_size` diagonals (the
    `keep_last` nearest the main one always). Diagonals become the `block`-sized key blocks
    that hold them in each query block, columns stay index lists, as MInference's kernel does
    (its diagonal ranges start at the diagonal rather than on the block grid).

    `patterns`: optionally MInference's offline-searched per-head config (its
    `minference/configs/*_best_pattern*.json`: a list over layers of {"<query head>": [type,
    vertical_size, slash_size, score]}, read as `minference_prefill_kernel` reads it); its sizes
    replace `vertical_size`/`slash_size` for the heads it names (the others keep these). Type
    `vertical_and_slash` is estimated as above with at least `keep_first` columns and
    `keep_last` diagonals (MInference's floors are 30 and 50 with 30 and 100 forced: below 100
    it takes some of the forced diagonals by topk's tie order, here all of them); `stream_llm`
    (its `streaming_forward(n_init=vertical_size, n_local=slash_size)`) is the first
    vertical_size columns and the slash_size nearest diagonals; `block_sparse` is refused. With
    MInference's own settings (conf/sparse/minference.yaml: last_q 64, keep_first 30, keep_last
    100) the selections equal `minference_prefill_kernel`'s (tests/test_prefill_parity.py).
    The file's content is in the job key; the path is not."""

    file_locators = ("patterns",)  # the file is keyed by its content
    key_version = 2  # results changed meaning on CUDA: flex counted in-block columns twice

    vertical_size: int = 512
    slash_size: int = 512
    last_q: int = 256
    keep_first: int = 4
    keep_last: int = 64
    block: int = 64
    kernel: Kernel = "auto"
    patterns: str | None = None
    _patterns_path: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_block()
        for name in ("vertical_size", "slash_size", "last_q", "keep_first", "keep_last"):
            check_range(getattr(self, name), name, 0 if name.startswith("keep") else 1)
        if self.keep_first > self.vertical_size or self.keep_last > self.slash_size:
            raise ConfigError("keep_first/keep_last: expected at most vertical_size/slash_size")
        self._table: list[dict[int, tuple[str, int, int]]] | None = None
        if self.patterns is not None:
            self._patterns_path = method_file(self.patterns, None, "", "patterns",
                                              "MInference best_pattern", "")
            self._table = read_best_pattern(self._patterns_path, "patterns")

    def prepare(self, model_config, key: str) -> None:
        if self._table is None:
            return
        layers, heads, _, _ = model_shapes(model_config)
        if len(self._table) != layers:
            raise ConfigError(f"{key}.patterns: {self._patterns_path} has {len(self._table)} layers, "
                              f"the model {layers}")
        for i, layer in enumerate(self._table):
            bad = [h for h in layer if h >= heads]
            if bad:
                raise ConfigError(f"{key}.patterns: layer {i} names head {bad[0]}, the model has "
                                  f"{heads} query heads")

    def head_sizes(self, layer: int, heads: int) -> tuple[list[int], list[int], list[bool]]:
        """Per query head (vertical size, slash size, streaming) for `layer`."""
        table = {} if self._table is None else self._table[layer]
        sizes = [table.get(h, ("vertical_and_slash", self.vertical_size, self.slash_size))
                 for h in range(heads)]
        stream = [t == "stream_llm" for t, _, _ in sizes]
        n_v = [v if st else max(v, self.keep_first) for (_, v, _), st in zip(sizes, stream, strict=True)]
        n_s = [s if st else max(s, self.keep_last) for (_, _, s), st in zip(sizes, stream, strict=True)]
        return n_v, n_s, stream

    def estimate(self, query: Tensor, key: Tensor, start: int, layer: int | None = None
                 ) -> tuple[Tensor, Tensor]:
        """(vertical columns [b, H, nv], diagonal offsets [b, H, ns]; 0 = the main diagonal).
        With a `patterns` file and `layer`, per-head counts (unused column slots hold `kv`)."""
        kv = key.shape[2]
        vertical, slash = last_rows_sums(query, key, min(self.last_q, query.shape[2]))
        vertical[..., :self.keep_first] = float("inf")
        slash[..., kv - self.keep_last:] = float("inf")
        if self._table is None or layer is None:
            columns = vertical.topk(min(self.vertical_size, kv), -1).indices
            offsets = (kv - 1) - slash.topk(min(self.slash_size, kv), -1).indices
            return columns, offsets
        n_v, n_s, stream = self.head_sizes(layer, query.shape[1])
        dev = query.device
        for h, st in enumerate(stream):
            if st:  # the first n_v columns and the n_s nearest diagonals
                vertical[:, h] = torch.where(torch.arange(kv, device=dev) < n_v[h], float("inf"), float("-inf"))
                slash[:, h] = torch.where(torch.arange(kv, device=dev) >= kv - n_s[h], float("inf"), float("-inf"))
        return ragged_top(vertical, slash, torch.tensor(n_v, device=dev).clamp(max=kv),
                          torch.tensor(n_s, device=dev).clamp(max=kv))

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        return self._pattern(query, key, start, None)

    def layer_pattern(self, query: Tensor, key: Tensor, start: int, layer: int) -> Pattern:
        if self._table is None:
            return self.pattern(query, key, start)
        return self._pattern(query, key, start, layer)

    def _pattern(self, query: Tensor, key: Tensor, start: int, layer: int | None) -> Pattern:
        columns, offsets = self.estimate(query, key, start, layer)
        return Pattern(self.block, start, diagonal_blocks(offsets, start, key.shape[2], self.block),
                       columns)


def read_best_pattern(path: Path, key: str) -> list[dict[int, tuple[str, int, int]]]:
    """MInference's best_pattern JSON: [{"<head>": [type, vertical_size, slash_size, score]}, ...]
    per layer -> per layer {head: (type, vertical_size, slash_size)}; ConfigError naming `key`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {path} as JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(layer, dict) for layer in data):
        raise ConfigError(f"{key}: {path} is not a MInference best_pattern file (expected a list "
                          "over layers of {\"<head>\": [type, vertical_size, slash_size, score]})")
    table = []
    for i, layer in enumerate(data):
        heads: dict[int, tuple[str, int, int]] = {}
        for h, entry in layer.items():
            where = f"{key}: {path} layer {i} head {h!r}"
            if not (str(h).isdigit() and isinstance(entry, list) and len(entry) >= 3
                    and isinstance(entry[1], int) and isinstance(entry[2], int)
                    and entry[1] >= 1 and entry[2] >= 1):
                raise ConfigError(f"{where}: expected [type, vertical_size >= 1, slash_size >= 1, score]")
            if entry[0] not in ("vertical_and_slash", "stream_llm"):
                raise ConfigError(f"{where}: pattern type {entry[0]!r} is not supported "
                                  "(vertical_and_slash, stream_llm)")
            heads[int(h)] = (entry[0], entry[1], entry[2])
        table.append(heads)
    return table


def ragged_top(vertical: Tensor, slash: Tensor, n_v: Tensor, n_s: Tensor) -> tuple[Tensor, Tensor]:
    """Per head its own counts n_v, n_s ([b, H] or [H]) of the top columns and diagonals of the
    scores vertical, slash [b, H, kv]: (columns, offsets); a head with fewer columns than the
    widest pads with `kv` (an unused slot), with fewer diagonals by repeating its first (the
    blocks are a union)."""
    kv = vertical.shape[-1]
    top_v = vertical.topk(int(n_v.max()), -1).indices
    top_s = slash.topk(int(n_s.max()), -1).indices
    rank = torch.arange(top_v.shape[-1], device=vertical.device)
    columns = torch.where(rank < n_v[..., None], top_v, kv)
    rank = torch.arange(top_s.shape[-1], device=vertical.device)
    offsets = (kv - 1) - torch.where(rank < n_s[..., None], top_s, top_s[..., :1])
    return columns, offsets


def diagonal_blocks(offsets: Tensor, start: int, kv: int, block: int) -> Tensor:
    """bool [b, H, nq, nk]: the key blocks holding diagonal `offsets` [b, H, n] for the rows of
    each query block (rows p0 .. p1 - 1 read keys p0 - o .. p1 - 1 - o)."""
    b, h, _ = offsets.shape
    dev = offsets.device
    first, nk = start // block, n_blocks(kv, block)
    nq = nk - first
    qb = torch.arange(first, nk, device=dev)
    p0 = (qb * block).clamp(min=start)[:, None]  # [nq, 1]
    p1 = ((qb + 1) * block).clamp(max=kv)[:, None]
    o = offsets[:, :, None, :]  # [b, H, 1, n]
    hi_key = p1 - 1 - o
    present = hi_key >= 0
    lo = ((p0 - o).clamp(min=0) // block).clamp(max=nk)
    hi = (hi_key.clamp(min=0) // block + 1).clamp(max=nk)
    delta = torch.zeros(b, h, nq, nk + 1, dtype=torch.int32, device=dev)
    one = present.to(torch.int32)
    delta.scatter_add_(-1, torch.where(present, lo, nk), one)
    delta.scatter_add_(-1, torch.where(present, hi, nk), -one)
    return delta[..., :nk].cumsum(-1) > 0


@dataclass
class AShape(PrefillMethod):
    """MInference's A-shape (StreamingLLM in prefill; minference/models_patch.py defaults
    n_init 128, n_local 3968): each query block computes the key blocks holding the first
    `n_init` keys and those within `n_local` keys of its rows, on a `block` grid."""

    n_init: int = 128
    n_local: int = 3968
    block: int = 64
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        self._check_block()
        check_range(self.n_init, "n_init", 0)
        check_range(self.n_local, "n_local", 1)

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        b, h = query.shape[:2]
        kv = key.shape[2]
        return Pattern(self.block, start, self._shape(start, kv, query.device).expand(b, h, -1, -1))

    def _shape(self, start: int, kv: int, dev) -> Tensor:
        block = self.block
        first, nk = start // block, n_blocks(kv, block)
        qb = torch.arange(first, nk, device=dev)[:, None]
        kb = torch.arange(nk, device=dev)[None, :]
        p0 = (qb * block).clamp(min=start)
        near = (kb + 1) * block - 1 >= p0 - (self.n_local - 1)  # a key within n_local of row p0
        return causal_blocks(start, kv, block, dev) & (near | (kb * block < self.n_init))


@dataclass
class TriShape(AShape):
    """MInference's tri-shape (models_patch.py defaults n_init 128, n_local 3968, n_last 100):
    A-shape, plus the query blocks holding the last `n_last` rows of each prefill pass (the
    prompt's last rows with one pass) compute every key block."""

    n_last: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.n_last, "n_last", 0)

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        b, h = query.shape[:2]
        kv = key.shape[2]
        shape = self._shape(start, kv, query.device)
        if self.n_last:
            last = (max(start, kv - self.n_last) // self.block) - start // self.block
            shape[last:] = causal_blocks(start, kv, self.block, query.device)[last:]
        return Pattern(self.block, start, shape.expand(b, h, -1, -1))


def _pooled(x: Tensor, first_pos: int, block: int) -> Tensor:
    """[b, h, n, d] rows at positions first_pos.. -> [b, h, blocks, d]: the sum over each grid
    block's rows divided by `block` (the reference's mean over zero-padded blocks)."""
    b, h, n, d = x.shape
    lead = first_pos % block
    total = lead + n
    x = torch.nn.functional.pad(x.float(), (0, 0, lead, n_blocks(total, block) * block - total))
    return x.view(b, h, -1, block, d).sum(-2) / block


@dataclass
class BlockSparse(PrefillMethod):
    """sparse-frontier's block-sparse prefill (`BlockSparseAttentionMInference`,
    `_build_block_index`; configs/attention/block_sparse.yaml: chunk_size 16, top_chunks 64):
    query and key blocks of `block` positions are mean-pooled, each query block keeps the
    `top_k` causal key blocks with the highest pooled dot product, the first block, its own
    and the one before it always. `keep_local: false` is MInference's own `_build_block_index`
    (minference/ops/block_sparse_flash_attention.py; block 64, top_k 100 in its kernel): the
    `top_k` highest causal blocks, none forced."""

    block: int = 16
    top_k: int = 64
    keep_local: bool = True
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        self._check_block()
        check_range(self.top_k, "top_k", 3 if self.keep_local else 1)

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        kv = key.shape[2]
        qp = _pooled(query, start, self.block)
        kp = _pooled(key, 0, self.block)
        scores = grouped_scores(qp, kp)  # [b, H, nq, nk]
        nq, nk = scores.shape[-2:]
        qb = torch.arange(nq, device=query.device)[:, None] + start // self.block
        kb = torch.arange(nk, device=query.device)[None, :]
        if self.keep_local:
            scores = scores.masked_fill((kb == qb) | (kb == qb - 1) | (kb == 0), float("inf"))
        scores = scores.masked_fill(kb > qb, float("-inf"))
        top = scores.topk(min(self.top_k, nk), -1)
        blocks = torch.zeros_like(scores, dtype=torch.bool)
        blocks.scatter_(-1, top.indices, top.values > float("-inf"))
        return Pattern(self.block, start, blocks & causal_blocks(start, kv, self.block, query.device))


@dataclass
class XAttention(PrefillMethod):
    """XAttention (https://arxiv.org/abs/2503.16428; xattn/src/Xattention.py `xattn_estimate`,
    xattn/src/utils.py `find_blocks_chunked`): strided antidiagonal scores (query rows
    reversed within each `stride` group against key rows in order, i.e. the sum of each
    stride x stride cell's antidiagonal), scaled by 1/(sqrt(d) * stride), causal at the
    stride level, softmaxed, summed into `block` x `block` block scores; each query block
    keeps its own key block and key block 0 (which counts in the running sum only when the
    chunk does not start at block 0, as in the reference's mask), then the others by decreasing score while the sum before each
    stays below `threshold` of the row's total (the reference's `cumulative_sum_without_self`,
    which takes the best other block whatever its score). Parity: tests/test_prefill_parity.py
    against `xattn_estimate(use_triton=False)`, one pass and chunked."""

    key_version = 2  # selection fixed to the reference's (block 0, the sum before each block)

    stride: int = 8
    threshold: float = 0.9
    block: int = 128
    kernel: Kernel = "auto"
    # strided query rows scored per matmul, each against the keys before its end only (about
    # the causal half of the estimate; not a YAML key: the scores are the same). 64: the
    # scores of a tile stay in cache for the softmax's passes (8k tokens, 32/8 heads, 1
    # thread: 0.77 CPU s with 512, 0.57 with 64 or 128, 0.70 with 16)
    tile_rows = 64

    def __post_init__(self) -> None:
        self._check_block()
        check_range(self.stride, "stride", 1)
        check_range(self.threshold, "threshold", 0.0, 1.0, low_open=True)
        if self.block % self.stride:
            raise ConfigError(f"block: expected a multiple of stride {self.stride}, got {self.block}")

    def block_scores(self, query: Tensor, key: Tensor, start: int) -> Tensor:
        """float32 [b, H, nq, nk]: the softmaxed antidiagonal scores summed per block pair.

        Cost (8B-shaped layer, CPU): the strided products are ~1/16 of dense attention's flops,
        the softmax over them as many elementwise passes as it takes; so a tile of
        `tile_rows` strided query rows (x the kv head's g query heads) is scored against the
        keys before its end only into one reused buffer, small enough for the passes to stay
        in cache, and softmaxed in place: the row maximum subtracted, exp, summed per key block
        (then divided by the row's total) before the sum over each block's rows. The stride
        group's reversal is applied to the keys (the same products), not to the g x larger
        query."""
        b, h, q, d = query.shape
        hk, kv = key.shape[1], key.shape[2]
        g, s, block = h // hk, self.stride, self.block
        dev = query.device
        first = start // block
        qpad = start - first * block
        nq, nk = n_blocks(kv, block) - first, n_blocks(kv, block)
        rows = nq * block // s  # strided query rows
        qx = pad_rows(query.float(), qpad, nq * block - qpad - q).view(b, h, rows, s * d)
        # key group i: keys i*s + s-1-j (j = 0..s-1) side by side, against query rows i*s + j
        kx = pad_rows(key.float(), 0, nk * block - kv).view(b, hk, -1, s, d).flip(-2)
        kx = kx.reshape(b, hk, -1, s * d).transpose(-1, -2)  # [b, hk, s*d, nk*block/s]
        q0 = first * block // s  # strided position of query row 0
        per = block // s
        # off the CPU no cache to fit: tiles of at least 512 rows (fewer launches)
        rows_per_tile = self.tile_rows if dev.type == "cpu" else max(self.tile_rows, 512)
        tile = per * max(1, rows_per_tile // per)
        scale = 1.0 / (d ** 0.5 * s)
        ends = torch.arange(rows, device=dev) * s
        real = (ends + s - 1 >= qpad) & (ends < qpad + q)  # strided rows holding a query
        kpos = torch.arange(kx.shape[-1], device=dev)
        buf = torch.empty(g * tile * kx.shape[-1], device=dev)
        out = torch.zeros(b, h, nq, nk, device=dev)
        for bi in range(b):
            for j in range(hk):
                for r0 in range(0, rows, tile):
                    r1 = min(rows, r0 + tile)
                    t = r1 - r0
                    kmax = min(kx.shape[-1], n_blocks(q0 + r1, per) * per)  # keys before the end
                    w = buf[:g * t * kmax].view(g * t, kmax)
                    torch.mm(qx[bi, j * g:(j + 1) * g, r0:r1].reshape(g * t, s * d), kx[bi, j, :, :kmax], out=w)
                    w = w.view(g, t, kmax)
                    lo = min(q0 + r0 + 1, kmax)  # keys after the tile's first row: the causal band
                    band = w[:, :, lo:]
                    cut = (kpos[None, lo:kmax] > (q0 + r0 + torch.arange(t, device=dev))[:, None]) | (
                        kpos[None, lo:kmax] * s >= kv)
                    band.masked_fill_(cut, float("-inf"))
                    if lo > n_blocks(kv, s):  # strided keys past the last key before the band
                        w[:, :, :lo].masked_fill_(kpos[:lo] * s >= kv, float("-inf"))
                    w.sub_(w.amax(-1, keepdim=True)).mul_(scale).exp_()  # key 0 is never cut
                    sums = w.view(g, t, kmax // per, per).sum(-1)
                    sums.div_(sums.sum(-1, keepdim=True)).mul_(real[r0:r1, None])
                    out[bi, j * g:(j + 1) * g, r0 // per:r1 // per, :kmax // per] = sums.view(
                        g, t // per, per, -1).sum(2)
        return out

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        kv = key.shape[2]
        scores = self.block_scores(query, key, start).double()
        nq, nk = scores.shape[-2:]
        dev = query.device
        qb = torch.arange(nq, device=dev)[:, None] + start // self.block
        kb = torch.arange(nk, device=dev)[None, :]
        # the reference forces key block 0 too, except in a chunk that starts at block 0: there
        # its diagonal (`torch.eye` over the chunk's columns) overwrites column 0
        first_kept = start // self.block > 0
        forced = ((kb == qb) | ((kb == 0) & first_kept)).expand_as(scores)
        required = scores.sum(-1, keepdim=True) * self.threshold
        others = scores.masked_fill(forced, 0.0).sort(-1, descending=True).values
        n_forced = forced.sum(-1, keepdim=True)
        kept = scores.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
        # the reference's sum before each position of [forced..., others...] (its
        # `cumulative_sum_without_self`): 0, 0, the forced total, then the forced total plus the
        # others before the current one; with one forced block (query block 0) the best other
        # is taken unconditionally, as there (it is never causal)
        zero = torch.zeros_like(kept)
        running = torch.cat([zero, zero, kept, others], -1)[..., :nk].cumsum(-1)
        order = torch.where(forced, 100000 * (1 + scores), scores).sort(-1, descending=True).indices
        take = running < required
        take |= torch.arange(nk, device=dev) < n_forced  # the forced blocks whatever the sum
        blocks = torch.zeros_like(scores, dtype=torch.bool)
        blocks.scatter_(-1, order, take)
        blocks[..., 0] = True  # the reference writes a position it does not take as block 0
        return Pattern(self.block, start, blocks & causal_blocks(start, kv, self.block, dev))


def _cover(x: Tensor, alpha: float) -> Tensor:
    """long [...]: how many of the largest entries of x (a distribution over the last dim) it
    takes to cover `alpha` of it: 1 + the count whose running sum (descending) is <= alpha."""
    return (x.sort(-1, descending=True).values.cumsum(-1) <= alpha).sum(-1) + 1


@dataclass
class FlexPrefill(PrefillMethod):
    """FlexPrefill (https://arxiv.org/abs/2502.20766) as sparse-frontier runs it
    (PiotrNawrot/sparse-frontier@31d86c170248865183d6569c491d47f71cdd9d53,
    sparse_frontier/modelling/attention/efficient_prefilling.py `FlexPrefill`,
    configs/attention/flexprefill.yaml: alpha 0.65, approximation_size 512, min_budget 512): a
    vertical-slash pattern whose sizes adapt per head. The last `approximation` queries of the
    chunk (scaled by 1/sqrt(d)) score every key, causally, softmaxed in float32; the columns'
    mean over those rows and the diagonals' sums divided by `approximation` are two
    distributions; each head keeps the fewest columns and diagonals that cover `alpha` of them
    (the count whose descending running sum stays <= alpha, plus one), at least `min_budget`;
    the first `keep_first` columns and the `keep_last` nearest diagonals always (the reference's
    4 and 64, forced after the counts are taken). Diagonals become the `block`-sized key blocks
    that hold them (the reference runs MInference's vertical-slash kernel, blocks of 64).

    The authors' own selection (query-aware heads, gamma, tau, block 128) is
    `FlexPrefillBytedance` (conf/sparse/flexprefill_bytedance.yaml)."""

    key_version = 2  # results changed meaning on CUDA: flex counted in-block columns twice

    alpha: float = 0.65
    approximation: int = 512
    min_budget: int = 512
    keep_first: int = 4
    keep_last: int = 64
    block: int = 64
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        self._check_block()
        check_range(self.alpha, "alpha", 0.0, 1.0, low_open=True)
        check_range(self.approximation, "approximation", 1)
        check_range(self.min_budget, "min_budget", 1)
        check_range(self.keep_first, "keep_first", 0)
        check_range(self.keep_last, "keep_last", 0)

    def estimate(self, query: Tensor, key: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(columns [b, H, nv], diagonal offsets [b, H, ns]): per head its own counts; a head
        with fewer columns than the widest pads with `kv` (an unused slot), with fewer
        diagonals by repeating its first (the blocks are a union)."""
        kv = key.shape[2]
        r = min(self.approximation, query.shape[2])
        vertical, slash = last_rows_sums(query, key, r)
        vertical, slash = vertical / r, slash / r  # the reference's mean over rows; sums / r
        n_v = _cover(vertical, self.alpha).clamp(min=self.min_budget, max=kv)  # [b, H]
        n_s = _cover(slash, self.alpha).clamp(min=self.min_budget, max=kv)
        vertical[..., :self.keep_first] = float("inf")
        slash[..., kv - self.keep_last:] = float("inf")
        return ragged_top(vertical, slash, n_v, n_s)

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        columns, offsets = self.estimate(query, key, start)
        return Pattern(self.block, start, diagonal_blocks(offsets, start, key.shape[2], self.block),
                       columns)


def _block_sums(x: Tensor, block: int) -> Tensor:
    """[..., n] -> [..., ceil(n / block)]: sums over consecutive `block` entries (last one short)."""
    n = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, n_blocks(n, block) * block - n))
    return x.view(*x.shape[:-1], -1, block).sum(-1)


def _block_means(x: Tensor, first_pos: int, block: int) -> Tensor:
    """[b, h, n, d] rows at positions first_pos.. -> [b, h, blocks, d] float32: each grid
    block's mean over its rows that are present."""
    n = x.shape[2]
    edges = torch.arange(first_pos // block, n_blocks(first_pos + n, block) + 1, device=x.device) * block
    edges = edges.clamp(min=first_pos, max=first_pos + n)
    return _pooled(x, first_pos, block) * (block / (edges[1:] - edges[:-1]))[:, None]


def _sqrt_js(p: Tensor, q: Tensor) -> Tensor:
    """Square root of the Jensen-Shannon divergence of distributions p, q over the last dim."""
    m = (p + q) / 2
    return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).sqrt()


def _top_mask(scores: Tensor, counts: Tensor) -> Tensor:
    """bool like scores [b, H, n]: each head's `counts` [b, H] highest entries."""
    top = scores.topk(min(int(counts.max()), scores.shape[-1]), -1).indices
    keep = torch.arange(top.shape[-1], device=scores.device) < counts[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, keep)


@dataclass
class FlexPrefillBytedance(PrefillMethod):
    """FlexPrefill as its authors define it (https://arxiv.org/abs/2502.20766;
    bytedance/FlexPrefill@a24b27bf117fd6ad4ba34b0db82c598e7786fd59,
    flex_prefill/ops/flex_prefill_attention.py `flex_prefill_attention`, `get_active_blocks`;
    defaults of flex_prefill/modules/patch.py: gamma 0.9, tau 0.1, min_budget 1024, max_budget
    none, block 128). Everything is on the `block` grid; per head:

    - the chunk's last `block` queries (scaled by 1/sqrt(d)) score every key, causally,
      softmaxed in float32: the columns' mean and the diagonals' sums / rows (as `FlexPrefill`)
      are two distributions over keys and diagonals, summed per block;
    - query-aware test: the softmax over key blocks of those queries' mean against each key
      block's mean key, compared with the block-summed column distribution; a head whose
      square-root Jensen-Shannon divergence is below `tau` is query-aware;
    - every head keeps the key blocks of its top vertical blocks (every query block) and its
      top block diagonals (query block i + s, key block i). Counts: the fewest keys
      (diagonals) covering `gamma` of the distribution (the count whose descending running
      sum stays <= gamma, plus one), // 128 + 1 (the reference's literal 128, whatever the
      block), clamped to [ceil(min_budget / block), ceil(max_budget / block)]; a query-aware
      head takes ceil(min_budget / block) of each. Key block 0 and the main block diagonal
      always;
    - a query-aware head adds the blocks of its pooled estimate: each query block's mean query
      (its rows in the chunk) against each key block's mean key, causal, softmaxed per query
      block; over all the chunk's query blocks together the largest while their running sum
      stays <= gamma x the number of query blocks.

    As the reference, a prompt of at most max(2 block, ceil(min_budget / block) block) keys is
    computed dense. The reference takes a whole prompt (its query and key lengths are equal);
    with chunked prefill the chunk's queries and query blocks stand for the prompt's, against
    every key so far. Parity: tests/unit/attention/test_prefill_parity.py (the reference's
    selection on the same Q/K, random and the embedded model's; one pass). MInference (microsoft/MInference@fb56c91, `flexprefill_forward`)
    runs the same code with gamma 0.9, tau 0.1, block 128 and no min_budget (= min_budget 1
    here); it passes the block size in `gqa_interleave`'s place, harmless there because it
    repeats the kv heads first."""

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    block: int = 128
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        self._check_block()
        check_range(self.gamma, "gamma", 0.0, 1.0, low_open=True)
        check_range(self.tau, "tau", 0.0, 1.0)
        check_range(self.min_budget, "min_budget", 1)
        if self.max_budget is not None:
            check_range(self.max_budget, "max_budget", 1)

    def is_dense(self, kv: int) -> bool:
        """The reference's fallback: too few keys for a sparse pass."""
        return kv <= max(2 * self.block, n_blocks(self.min_budget, self.block) * self.block)

    def estimate(self, query: Tensor, key: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(vertical key blocks [b, H, nk], block diagonals [b, H, nk] (index = offset),
        query-aware heads [b, H], their divergence [b, H])."""
        d = query.shape[-1]
        kv, block = key.shape[2], self.block
        nk = n_blocks(kv, block)
        r = min(block, query.shape[2])
        vertical, slash = last_rows_sums(query, key, r)
        vertical, slash = vertical / r, slash / r
        low = n_blocks(self.min_budget, block)
        high = nk if self.max_budget is None else min(n_blocks(self.max_budget, block), nk)
        n_v = (_cover(vertical, self.gamma) // 128 + 1).clamp(min=low).clamp(max=high)
        n_s = (_cover(slash, self.gamma) // 128 + 1).clamp(min=low).clamp(max=high)
        vertical, slash = _block_sums(vertical, block), _block_sums(slash, block)
        mean_q = query[:, :, -r:].float().mean(2, keepdim=True) * d ** -0.5
        pooled = grouped_scores(mean_q, _block_means(key, 0, block))[:, :, 0].softmax(-1)
        divergence = _sqrt_js(pooled, vertical)
        aware = divergence < self.tau
        n_v, n_s = n_v.masked_fill(aware, low), n_s.masked_fill(aware, low)
        vertical[..., 0] = float("inf")
        slash[..., -1] = float("inf")  # slash block j holds offsets nk - 1 - j
        return _top_mask(vertical, n_v), _top_mask(slash, n_s).flip(-1), aware, divergence

    def pattern(self, query: Tensor, key: Tensor, start: int) -> Pattern:
        b, h, _, d = query.shape
        kv, block = key.shape[2], self.block
        causal = causal_blocks(start, kv, block, query.device)  # [nq, nk]
        if self.is_dense(kv):
            return Pattern(block, start, causal.expand(b, h, -1, -1))
        columns, diagonals, aware, _ = self.estimate(query, key, start)
        nq, nk = causal.shape
        qb = torch.arange(nq, device=query.device)[:, None] + start // block
        kb = torch.arange(nk, device=query.device)[None, :]
        blocks = (columns[:, :, None, :] | diagonals[:, :, (qb - kb).clamp(min=0)]) & causal
        if aware.any():
            bi, hi = aware.nonzero(as_tuple=True)
            # [n, nq, d] and [n, nk, d]: the query-aware heads' block means only
            mean_q = _block_means(query[bi, hi][None], start, block)[0] * d ** -0.5
            mean_k = _block_means(key, 0, block)[bi, hi // (h // key.shape[1])]
            scores = (mean_q @ mean_k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
            scores = scores.softmax(-1).flatten(1)
            ranked, order = scores.sort(-1, descending=True)
            keep = ranked.cumsum(-1) <= self.gamma * nq
            blocks[bi, hi] |= torch.zeros_like(keep).scatter_(-1, order, keep).view(-1, nq, nk)
        return Pattern(block, start, blocks)
