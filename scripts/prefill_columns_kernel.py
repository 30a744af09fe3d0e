"""Vertical columns on CPU: MInference's way (blocks + column index lists, `attend_gather`)
against FlexAttention with the columns folded into its `mask_mod` (the block mask holds every
selected block and every causal block that holds a selected column), and dense SDPA causal.
Issue 19 item 3; docs/performance.md quotes it.

A vertical-slash pattern (`VerticalSlash`, blocks of 64, ~10% density: the columns scaled as
`vertical_size=2900` at 32k, 64 diagonals) of random q, k at 32 query / 8 kv heads, head dim
128, float32, 1 thread. CPU seconds (`time.process_time`) of a second call; FlexAttention's
compile (inductor's C++ backend, compilers in subprocesses) as the first call's wall time less
the second's. (a) and (b) are checked against
`attend_reference` (the exact pure-PyTorch path).

    OMP_NUM_THREADS=1 python scripts/prefill_columns_kernel.py [TOKENS ...]   # 4096 8192
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from sa_bench.attention.prefill import (
    attend_gather,
    attend_reference,
    causal_pairs,
    compiled_flex,
    computed_pairs,
    flex_block_mask,
)
from sa_bench.attention.prefill_methods import VerticalSlash


def timed(fn) -> tuple[torch.Tensor, float, float]:
    """(result, CPU s of this process, wall s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def flex_with_columns(pattern, query, key, value, scaling):
    """The pattern on FlexAttention alone: columns in the mask_mod, no log-sum-exp merge."""
    b, h, _, _ = query.shape
    kv, block = key.shape[2], pattern.block
    blocks = pattern.blocks
    is_col = torch.zeros(b, h, kv + 1, dtype=torch.bool).scatter_(-1, pattern.columns, True)[..., :kv]
    nk = blocks.shape[-1]
    holds_col = torch.nn.functional.pad(is_col, (0, nk * block - kv)).view(b, h, nk, block).any(-1)

    def mask_mod(bi, hi, qi, ki):
        return (qi >= ki) & (blocks[bi, hi, qi // block, ki // block] | is_col[bi, hi, ki])

    mask = flex_block_mask(pattern, query.shape[2], kv, mask_mod, holds_col[:, :, None, :])
    return compiled_flex()(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)


def kernels(pattern, q, k, v, scaling) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "dense": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True),
        "gather": lambda: attend_gather(pattern, q, k, v, scaling),
        "flex": lambda: flex_with_columns(pattern, q, k, v, scaling),
    }


def main() -> None:
    torch.set_num_threads(1)
    print("| tokens | density | blocks in the flex block mask | dense SDPA s | (a) gather s | ratio | "
          "(b) flex mask_mod s | ratio | flex compile wall s | max abs err (a), (b) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in [int(a) for a in sys.argv[1:]] or [4096, 8192]:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, h, n, 128, generator=gen) for h in (32, 8, 8))
        scaling = 128 ** -0.5
        method = VerticalSlash(vertical_size=max(64, 2900 * n // 32768), slash_size=64)
        pattern = method.pattern(q, k, 0)
        density = float(computed_pairs(pattern, n).mean()) / causal_pairs(0, n)
        ref = attend_reference(pattern, q, k, v, scaling)[0]
        runs = {}
        for name, fn in kernels(pattern, q, k, v, scaling).items():
            _, _, first_wall = timed(fn)
            out, again, wall = timed(fn)
            runs[name] = out, first_wall - wall, again
        err = [float((runs[m][0] - ref).abs().max()) for m in ("gather", "flex")]
        nk = pattern.blocks.shape[-1]
        cols = torch.zeros(1, 32, nk * 64 + 64, dtype=torch.bool).scatter_(-1, pattern.columns, True)
        holds = cols[..., :nk * 64].view(1, 32, nk, 64).any(-1)
        in_mask = float(((pattern.blocks | holds[:, :, None, :]) & torch.ones(nk, nk, dtype=torch.bool).tril())
                        .sum()) / (32 * nk * (nk + 1) / 2)
        d, g, f = runs["dense"][2], runs["gather"][2], runs["flex"][2]
        print(f"| {n} | {density:.3f} | {in_mask:.3f} of the causal blocks | {d:.2f} | {g:.2f} | {g / d:.2f}x | "
              f"{f:.2f} | {f / d:.2f}x | {runs['flex'][1] - f:.1f} | {err[0]:.1e}, {err[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
