"""Issue 21 item 9's second experiment: `torch.compile` (inductor, `dynamic=True`; on CPU its
C++ backend) on a sync-free method's whole decode attention call (`SparseMethod.attention`:
selection, gather and attention, with the bookkeeping), timed against the same call in eager
on a second instance of the method, at the perf.attention shape (32 query heads, 8 kv heads,
head dim 128, batch 1, 1 thread), over six growing-cache steps (one key more each), median
of 5 calls per step. `--accelerator` forces the accelerator's branches (density kept on
the device, no host reads), as a GPU runs them.

    python scripts/compile_decode_attention.py 16384 oracle_topk hashattn quest [--accelerator]

Prints one table row per method: eager ms, compiled ms, their ratio, and the largest
difference of the outputs (the compiled call must compute the same attention)."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from compile_quest_core import median_ms  # scripts/ is on the path when run as a script

from sa_bench.attention.ops import accelerator_paths
from sa_bench.perf.attention import load_method, model_files

H, HK, D = 32, 8, 128


def row(name: str, keys: int, files: Path) -> str:
    g = torch.Generator().manual_seed(keys)
    key, value = torch.randn(1, HK, keys, D, generator=g), torch.randn(1, HK, keys, D, generator=g)
    module = types.SimpleNamespace(layer_idx=0, training=False)
    args = types.SimpleNamespace(heads=H, kv_heads=HK, head_dim=D, ratio=None)
    eager, twin = load_method(name, args, files, keys), load_method(name, args, files, keys)
    first = (module, torch.randn(1, H, 1, D, generator=g), key, value, None, D**-0.5)
    eager.attention(*first)
    twin.attention(*first)
    compiled = torch.compile(twin.attention, dynamic=True)
    start = time.perf_counter()
    compiled(*first)
    compile_s = time.perf_counter() - start
    eager_ms, compiled_ms, diff = [], [], 0.0
    for _ in range(6):
        key = torch.cat([key, torch.randn(1, HK, 1, D, generator=g)], 2)
        value = torch.cat([value, torch.randn(1, HK, 1, D, generator=g)], 2)
        call = (module, torch.randn(1, H, 1, D, generator=g), key, value, None, D**-0.5)
        eager_ms.append(median_ms(eager.attention, call, reps=5))
        compiled_ms.append(median_ms(compiled, call, reps=5))
        diff = max(diff, (eager.attention(*call)[0] - compiled(*call)[0]).abs().max().item())
    e, c = statistics.median(eager_ms), statistics.median(compiled_ms)
    return f"| {name} | {keys} | {e:.2f} | {c:.2f} | {c / e:.2f} | {diff:.1e} | {compile_s:.0f} |"


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    forced = "--accelerator" in argv
    keys, *names = [a for a in argv if a != "--accelerator"]
    files = model_files(Path(tempfile.mkdtemp()), H, HK, D)
    print(f"# accelerator branches {'forced' if forced else 'off (CPU paths)'}")
    print("| method | keys | eager ms | compiled ms | compiled / eager | max output diff | "
          "first compile s |\n|---|---|---|---|---|---|---|")
    with accelerator_paths() if forced else contextlib.nullcontext():
        for name in names:
            print(row(name, int(keys), files), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
