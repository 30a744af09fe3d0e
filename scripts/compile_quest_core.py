"""Issue 21 item 9's experiment: `torch.compile` (inductor, dynamic shapes; on CPU its C++
backend) on Quest's decode selection core - page scores from the page statistics to the
selection's index and weight entries (`Quest.select` after `PageStats`, sink and local as one
gap, a uniform budget), a pure tensor function - timed against the same function in eager at
the perf.attention shape (32 query heads, 8 kv heads, head dim 128, batch 1, 1 thread), over
five growing-cache steps per size (one key more each: new shapes every step).

    python scripts/compile_quest_core.py 4096 16384 32768

The results (docs/performance.md) showed no gain on CPU, so the package does not compile."""

from __future__ import annotations

import statistics
import sys
import time

import torch

H, HK, D, PAGE, SINK, LOCAL, RATE = 32, 8, 128, 16, 4, 64, 0.1


def core(query, stats, lo, hi, offsets, sel_idx, sel_logw, kv: int, take: int, budget: int,
         gap_lo: int, gap_hi: int):
    """Quest's decode selection after the page statistics (see the module docstring)."""
    qs = torch.cat([query, query], -1).clamp_(lo, hi)
    score = torch.matmul(qs.reshape(1, HK, H // HK, 2 * D), stats.transpose(-1, -2))
    _, top = score.reshape(1, H, 1, -1).topk(take, -1, sorted=True)
    keys = torch.add(offsets, top.unsqueeze(-1), alpha=PAGE).flatten(-2)
    ok = (keys >= gap_lo) & (keys < gap_hi)
    keys = keys.clamp(max=kv - 1)
    ok &= ok.cumsum(-1, dtype=torch.int32) <= budget
    idx = torch.where(ok, keys, kv)
    logw = torch.where(ok, 0.0, float("-inf"))
    return torch.cat([sel_idx, idx], -1), torch.cat([sel_logw, logw], -1)


def inputs(kv: int) -> tuple:
    gen = torch.Generator().manual_seed(kv)
    pages = -(-kv // PAGE)
    inf = float("inf")
    kept = SINK + LOCAL
    budget = round(kv * RATE)
    return (torch.randn(1, H, 1, D, generator=gen), torch.randn(1, HK, pages, 2 * D, generator=gen),
            torch.tensor([0.0] * D + [-inf] * D), torch.tensor([inf] * D + [0.0] * D),
            torch.arange(PAGE),
            torch.cat([torch.arange(SINK), torch.arange(kv - LOCAL, kv)]).expand(1, H, 1, kept),
            torch.zeros(()).expand(1, H, 1, kept), kv,
            min(pages, -(-(budget + kept) // PAGE) + 2), budget, SINK, kv - LOCAL)


def median_ms(fn, args: tuple, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(sizes: list[int]) -> None:
    torch.set_num_threads(1)
    compiled = torch.compile(core, dynamic=True)
    start = time.perf_counter()
    compiled(*inputs(sizes[0] + 1))
    print(f"first compilation: {time.perf_counter() - start:.1f} s")
    print("| keys | eager ms | compiled ms | compiled / eager |\n|---|---|---|---|")
    for kv0 in sizes:
        eager, fused = [], []
        for step in range(5):
            args = inputs(kv0 + step)
            a, b = core(*args), compiled(*args)
            if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                raise SystemExit(f"{kv0 + step} keys: the compiled selection differs from eager")
            eager.append(median_ms(core, args))
            fused.append(median_ms(compiled, args))
        e, c = statistics.median(eager), statistics.median(fused)
        print(f"| {kv0} | {e:.3f} | {c:.3f} | {c / e:.2f} |")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [4096, 16384, 32768])
