"""Small tensor helpers of the maskers and kernels: top-k per row, counts and compaction of
bool rows, the keys a mask allows, sampling weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sa_bench.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

NEG_INF = float("-inf")
_ACCELERATOR_PATHS: list[bool] = []


def reads_free(device) -> bool:
    """Whether reading a tensor's values on the host costs nothing (CPU); on an accelerator a
    read is a device sync, and the code takes a path without one. `accelerator_paths()` makes
    CPU take those paths too (operator and sync counts, tests)."""
    return device.type == "cpu" and not _ACCELERATOR_PATHS


@contextmanager
def accelerator_paths() -> Iterator[None]:
    """Within the block, CPU tensors take the paths an accelerator takes (`reads_free` False)."""
    _ACCELERATOR_PATHS.append(True)
    try:
        yield
    finally:
        _ACCELERATOR_PATHS.pop()


def top_rows(scores: Tensor, k: Tensor | int, kmax: int | None = None,
             finite: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Per row, the k[row] highest finite entries of `scores` [b, H, q, kv].

    k broadcasts to [b, H, q] (an int: the same for every row); `kmax` is an upper bound of k
    (read from k when None, a device sync). Returns (idx, valid) of shape [b, H, q, kmax].
    `finite`: a lower bound, known without reading them, of the finite entries of every row;
    with an int k <= finite every entry is valid and `valid` is None (nothing computed).
    """
    if isinstance(k, int):
        kmax = min(k, scores.shape[-1])
        if kmax == 0:
            empty = scores.new_zeros(*scores.shape[:3], 0)
            return empty.long(), empty.bool()
        idx = scores.topk(kmax, dim=-1, sorted=False).indices if not (
            reads_free(scores.device) and scores.dtype == torch.float32) else \
            ordered_ints(scores).topk(kmax, dim=-1, sorted=False).indices
        if finite is not None and kmax <= finite:
            return idx, None
        return idx, scores.gather(-1, idx) > NEG_INF
    k = k.expand(scores.shape[:3])
    if kmax is None:
        kmax = int(k.max()) if k.numel() else 0
    kmax = min(kmax, scores.shape[-1])
    if kmax == 0:
        empty = scores.new_zeros(*scores.shape[:3], 0)
        return empty.long(), empty.bool()
    # on CPU reading k is free; on an accelerator sorting avoids a sync
    uniform = reads_free(scores.device) and bool((k == kmax).all())
    if reads_free(scores.device) and scores.dtype == torch.float32:
        idx = ordered_ints(scores).topk(kmax, dim=-1, sorted=not uniform).indices
        valid = scores.gather(-1, idx) > NEG_INF
    else:
        vals, idx = scores.topk(kmax, dim=-1, sorted=not uniform)
        valid = vals > NEG_INF
    if not uniform:
        valid &= torch.arange(kmax, device=scores.device) < k.unsqueeze(-1)
    return idx, valid


def ordered_ints(x: Tensor) -> Tensor:
    """float32 -> int32 in the same order (-inf lowest, -0.0 just below +0.0; no NaN): the
    sign bit's flip of the other bits. `torch.topk` on CPU is ~1.4x faster on the ints (~10%
    with this conversion)."""
    bits = x.view(torch.int32)
    return bits ^ (bits >> 31).bitwise_and_(0x7FFFFFFF)


def count_true(mask: Tensor) -> Tensor:
    """True entries of each row of a bool [..., n] -> long [...]: bytes summed into int32,
    ~7x faster on CPU than summing the bools."""
    return mask.view(torch.uint8).sum(-1, dtype=torch.int32).long()


def compact(mask: Tensor, fill: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of each row of `mask` [..., n] -> (idx, valid) [..., w],
    w the largest row count (read from the device: one sync), padding `fill`. Few entries
    (w <= n / 8) on CPU: from `nonzero`; else O(n) with a running count placing each True entry
    (int32 cumsum + scatter; on CPU faster than nonzero for dense masks, ~2x slower for sparse
    ones; on an accelerator no second sync, which `nonzero` is). `positions`: an arange of at
    least n + 1 entries on the mask's device (a cached one: no launch to make it)."""
    n = mask.shape[-1]
    count = count_true(mask)
    width = int(count.max()) if count.numel() else 0
    if positions is None or positions.shape[0] < n:
        positions = torch.arange(n, device=mask.device)
    valid = positions[:width] < count.unsqueeze(-1)
    if width * 8 <= n and reads_free(mask.device):
        rows = mask.reshape(-1, n)
        row, col = rows.nonzero().unbind(1)  # sorted by row, then position
        start = count.reshape(-1).cumsum(0) - count.reshape(-1)
        idx = torch.full((rows.shape[0], width), fill, dtype=torch.long, device=mask.device)
        idx[row, torch.arange(row.shape[0], device=mask.device) - start[row]] = col
        return idx.view(*mask.shape[:-1], width), valid
    slot = torch.where(mask, mask.cumsum(-1).sub_(1), width)
    idx = torch.full((*mask.shape[:-1], width + 1), fill, dtype=torch.long, device=mask.device)
    idx.scatter_(-1, slot, positions[:n].expand(mask.shape))
    return idx[..., :width], valid


def first_allowed(allowed: Tensor) -> Tensor:
    """Index of the first key each row may see, [b, 1, q]."""
    return allowed.to(torch.uint8).argmax(-1)  # uint8: ~40x faster than int32 on CPU


def bottom_right_causal(q: int, kv: int, device) -> Tensor:
    """Bool [q, kv]: the last q of kv positions as queries, each seeing the keys up to its own."""
    return torch.arange(kv, device=device)[None, :] <= (kv - q + torch.arange(q, device=device))[:, None]


def allowed_from_mask(attention_mask: Tensor | None, b: int, q: int, kv: int, device) -> Tensor:
    """Bool [b, 1, q, kv] of the keys each query may attend to (causal when mask is None)."""
    if attention_mask is None:
        return bottom_right_causal(q, kv, device).expand(b, 1, q, kv)
    mask = attention_mask[:, :, :, :kv]
    if mask.dtype == torch.bool:
        return mask.expand(b, 1, q, kv)
    return (mask > torch.finfo(mask.dtype).min / 2).expand(b, 1, q, kv)


def log_weight(prob: Tensor) -> Tensor:
    """log(1 / pi) for inclusion probability pi."""
    return -torch.log(prob.clamp_min(1e-30))


def out_dtype_matmul(device) -> bool:
    """Whether a half-precision matmul can write float32 directly (`torch.bmm(...,
    out_dtype=torch.float32)`: CUDA kernels only; CPU has no such kernel)."""
    return device.type == "cuda"


def float_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [..., m, k] @ b [..., k, n] -> float32 [..., m, n] (the batch dims of a and b equal).

    Attention scores from bf16 / fp16 inputs: a half-precision product rounds every score to
    8 (bf16) bits of mantissa before the softmax - an error larger than the sparsity error
    being measured. On CUDA the matmul writes float32 from its float32 accumulator (no copy of
    the operands); elsewhere the operands are upcast first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and out_dtype_matmul(a.device):
        batch = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
                        out_dtype=torch.float32)
        return out.view(*batch, a.shape[-2], b.shape[-1])
    return torch.matmul(a.float(), b.float())


def merge_softmax(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmax-normalised partial outputs merged through their log-sum-exps, into o1 (the
    callers' own copy). The outputs are finite (a row with no key has lse -inf, a weight 0)."""
    both = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - both).nan_to_num_(0.0)[..., None]
    w2 = torch.exp(l2 - both).nan_to_num_(0.0)[..., None]
    return o1.mul_(w1).addcmul_(o2, w2), both
