"""Time one decode step's attention for every method, as a ratio to dense SDPA.

    python -m sa_bench.perf.attention [--keys 4096 16384 32768] [--repeat 5] [--methods ...]

Tensors have a real model's attention shape (32 query heads, 8 kv heads, head dim 128,
batch 1, one query). Each method runs its decode path (key caches warm, as in steady-state
decoding, with the model's float mask); the baseline is torch's scaled_dot_product_attention
on the same tensors (the faster of `enable_gqa=True` and grouping the query heads per kv head),
timed alternately with each method in the same run. Prints median milliseconds and ratios as a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sa_bench.attention.method import SparseMethod

CONF = Path(__file__).resolve().parents[2] / "conf" / "sparse"


def paired_ms(fn, base, repeat: int) -> tuple[float, float]:
    """Median ms of `fn` and of `base`, timed alternately so that load changes hit both."""
    fn()
    base()
    times: dict[str, list[float]] = {"fn": [], "base": []}
    for _ in range(repeat):
        for name, f in (("base", base), ("fn", fn)):
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["fn"]) * 1e3, statistics.median(times["base"]) * 1e3


def dense_sdpa(query, key, value):
    b, h, q, d = query.shape
    hk = key.shape[1]
    grouped = query.reshape(b, hk, (h // hk) * q, d)  # q = 1: query heads of a kv head as rows

    def run_grouped():
        return F.scaled_dot_product_attention(grouped, key, value)

    def run_gqa():
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    return run_grouped, run_gqa


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=None, help="conf/sparse names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.methods or sorted(p.stem for p in CONF.glob("*.yaml"))
    module = types.SimpleNamespace(layer_idx=0, training=False)
    rows: dict[str, list[str]] = {name: [] for name in names}
    dense_row, density_row = [], {name: "" for name in names}
    for kv in args.keys:
        g = torch.Generator().manual_seed(kv)
        h, hk, d = args.heads, args.kv_heads, args.head_dim
        query = torch.randn(1, h, 1, d, generator=g)
        key = torch.randn(1, hk, kv, d, generator=g)
        value = torch.randn(1, hk, kv, d, generator=g)
        mask = torch.zeros(1, 1, 1, kv)
        run_grouped, run_gqa = dense_sdpa(query, key, value)
        t_gqa, t_grouped = paired_ms(run_gqa, run_grouped, args.repeat)
        baseline = run_grouped if t_grouped <= t_gqa else run_gqa
        print(f"# {kv} keys: dense SDPA {t_grouped:.1f} ms (grouped query) / {t_gqa:.1f} ms "
              f"(enable_gqa); baseline: the faster", flush=True)
        bases = []
        for name in names:
            data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
            method = SparseMethod.from_config(data)
            method.num_layers = 1
            method.set_phase("decode")

            args_ = (module, query, key, value, mask, d**-0.5)

            def step(method=method, args_=args_):
                return method.attention(*args_)

            step()  # build per-layer key caches (signatures, labels, codes) once
            ms, base = paired_ms(step, baseline, args.repeat)
            bases.append(base)
            rows[name].append(f"{ms / base:.2f}x ({ms:.1f} ms)")
            density_row[name] = f"{method.stats()['density']['decode'][0]:.3f}"
        dense_row.append(f"{statistics.median(bases):.1f} ms")
    header = "| method | " + " | ".join(f"{kv // 1024}k keys" for kv in args.keys) + " | density @ max |"
    print()
    print(header)
    print("|" + "---|" * (len(args.keys) + 2))
    print("| dense SDPA (baseline) | " + " | ".join(dense_row) + " | 1.000 |")
    for name in names:
        print(f"| {name} | " + " | ".join(rows[name]) + f" | {density_row[name]} |")


if __name__ == "__main__":
    main()
