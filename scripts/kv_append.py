"""Time one token's append to one layer's KV cache at Llama-3.1-8B's kv shapes (8 kv heads,
head dim 128, float32, CPU, 1 thread): transformers' DynamicLayer (`torch.cat` of the whole
layer) against the job's PresizedLayer (written in place). docs/performance.md quotes it.

    python scripts/kv_append.py [KEYS ...]
"""

from __future__ import annotations

import sys
import time

import torch
from transformers.cache_utils import DynamicLayer

from sa_bench.attention.kv_cache import capacity, presized_layer


def ms_per_append(layer, n: int, steps: int = 20) -> float:
    k, one = torch.randn(1, 8, n, 128), torch.randn(1, 8, 1, 128)
    with torch.inference_mode():
        layer.update(k, k)
        for _ in range(3):
            layer.update(one, one)
        t0 = time.perf_counter()
        for _ in range(steps):
            layer.update(one, one)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for n in [int(a) for a in sys.argv[1:]] or [8192, 32768]:
        cat = ms_per_append(DynamicLayer(), n)
        in_place = ms_per_append(presized_layer()(capacity(n, 64)), n)
        print(f"{n} keys: DynamicLayer {cat:.2f} ms/token, PresizedLayer {in_place:.3f} ms/token")


if __name__ == "__main__":
    main()
