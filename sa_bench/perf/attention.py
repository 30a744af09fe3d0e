"""Time real decoding steps of every method's attention, as a ratio to dense SDPA.

    python -m sa_bench.perf.attention [--keys 4096 16384 32768 65536] [--steps 4]
        [--methods streaming quest ...] [--per-kv-head] [--ratio 0.75] [--device cuda --dtype bfloat16]

Tensors have a real model's attention shape (32 query heads, 8 kv heads, head dim 128,
batch 1). Decoding is simulated as in a job: every method first sees the context once (its
per-layer key caches are built), then each step appends one key and value to the cache
(`torch.cat`, as transformers' DynamicCache does; not timed) and calls the method's attention
for the new query with the mask a job passes when decoding without padding: none (our mask
function skips it, as transformers does). Key counts run from `keys + 3` (for up to 12
steps none is a multiple of 16, Quest's page size), so pages are partly filled. Within a step the baseline (SDPA with the query heads of a kv
head grouped as rows: `[b, Hk, g, d]` against `[b, Hk, kv, d]`), SDPA with `enable_gqa=True`
(reference) and every method are timed one after the other, in an order rotated per step, so
load changes hit all of them. Prints median milliseconds and the median of the per-step
ratios to the baseline as a markdown table, with the fraction of its keys a query head
attends and the operator calls of one decode call (`ops/call`, views included, on the batched
paths a GPU takes): at batch 1 a GPU pays a kernel launch of a few microseconds for most of
them, whatever the bytes read; and `launches` / `syncs` of that call as `sa_bench.perf.counts`
counts them with the accelerator's branches forced (non-view operators, host reads).

Compression methods (a `compression:` section) compress their cache once after the context,
at `--ratio` (`compress_context`: the context's last 64 queries through the method's attention
in prefill phase, so the press has the queries it reads, then `SparseMethod.compress`), and
decode on the compressed cache while the baselines read the full one; `KV kept` is the
fraction of the full cache's keys in the method's cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sa_bench.attention.compression import kept_count
from sa_bench.attention.gather import BATCHED_GATHER
from sa_bench.attention.kv_cache import presized_layer
from sa_bench.attention.method import SparseMethod

CONF = Path(__file__).resolve().parents[2] / "conf" / "sparse"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sdpa_grouped(query, key, value):
    """Dense decode baseline: the query heads of each kv head as rows (no K/V copies)."""
    b, h, q, d = query.shape
    hk = key.shape[1]
    return F.scaled_dot_product_attention(query.reshape(b, hk, (h // hk) * q, d), key, value)


def sdpa_gqa(query, key, value):
    return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)


def model_files(folder: Path, heads: int, kv_heads: int, head_dim: int, layers: int = 1) -> Path:
    """Files of methods fitted per model (`${model.pretrained}` in their configs), random for a
    model of the timed shape: hashattn weights in the published layout (per query head, MLP
    head_dim-128-128-32 as HashAttention-1.0's Llama-3.1-8B patch), Double Sparsity ranks."""
    from safetensors.torch import save_file

    from sa_bench.attention.double_sparsity import CALIBRATION_FILE
    from sa_bench.attention.hashattn import WEIGHTS_FILE, HashWeights

    HashWeights.init(layers, heads, head_dim, 32, (128, 128)).save(folder / WEIGHTS_FILE)
    rank = torch.stack([torch.stack([torch.randperm(head_dim) for _ in range(heads)])
                        for _ in range(layers)])
    save_file({"channel_rank": rank}, str(folder / CALIBRATION_FILE))
    return folder


KV_SUFFIX = "/kv"
"""A method name with this suffix: its maskers that have `per_kv_head` set it true."""


def method_config(name: str, files: Path, ratio: float | None = None, context: int | None = None) -> dict:
    """The `sparse` section of conf/sparse/<name>.yaml, its model files from `files`
    (`<name>/kv`: with `per_kv_head: true` on every masker that has it). `ratio` sets a
    compression press's `compression_ratio` (`compression_ratios` of a per-layer press, and a
    decoding press's `target_size` to the kept count of a `context`-key cache); a press whose
    ratios sit on the presses it composes keeps them."""
    base = name.removesuffix(KV_SUFFIX)
    data = yaml.safe_load((CONF / f"{base}.yaml").read_text().replace("${model.pretrained}", str(files)))
    press = data.get("compression")
    if ratio is not None and press is not None:
        if "compression_ratios" in press:
            press["compression_ratios"] = [ratio]
        elif "target_size" in press:
            if context is not None:
                press["target_size"] = kept_count(context, ratio)
        elif "compression_ratio" in press:
            press["compression_ratio"] = ratio
    if name != base:
        for masker in data["maskers"].values():
            if _takes_per_kv_head(masker):
                masker["per_kv_head"] = True
    return data


def _takes_per_kv_head(masker: dict) -> bool:
    module, _, cls = masker["_target_"].rpartition(".")
    return any(f.name == "per_kv_head" for f in dataclasses.fields(getattr(importlib.import_module(module), cls)))


def with_per_kv_head(names: list[str]) -> list[str]:
    """`names`, then `<name>/kv` for each method with a `per_kv_head` masker."""
    return names + [n + KV_SUFFIX for n in names if any(
        _takes_per_kv_head(m) for m in yaml.safe_load((CONF / f"{n}.yaml").read_text())["maskers"].values())]


def runs_model(name: str) -> bool:
    """Whether conf/sparse/<name>.yaml's press runs the model to score the cache (KVzip)."""
    press = yaml.safe_load((CONF / f"{name}.yaml").read_text()).get("compression") or {}
    module, _, cls = press.get("_target_", "").rpartition(".")
    return bool(module) and getattr(importlib.import_module(module), cls).reconstructs


def load_method(name: str, args, files: Path, context: int | None = None) -> SparseMethod:
    """`method_config(name, files, args.ratio, context)` on a 1-layer model of the timed shape."""
    method = SparseMethod.from_config(method_config(name, files, getattr(args, "ratio", None), context))
    method.num_layers = 1
    method.set_phase("decode")
    config = types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, head_dim=args.head_dim)
    for key, masker in method.maskers.items():
        masker.prepare(config, f"sparse.maskers.{key}")
    return method


PREFILL_QUERIES = 64
"""Queries of the context's end fed through a compression method's attention in prefill
phase before it compresses (at least its press's window; SnapKV reads 64)."""


def press_model(args) -> torch.nn.Module:
    """What `Compressor.prepare` reads from a model, for a 1-layer model of the timed shape: a
    Llama rotary embedding (presses that unrotate queries) and layer 0's output projection
    (random; CriticalKV reads it)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden = args.heads * args.head_dim
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_hidden_layers=1)
    model = torch.nn.Module()
    model.rotary_emb = LlamaRotaryEmbedding(config)
    model.attn = torch.nn.Module()
    model.attn.layer_idx = 0
    model.attn.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
    return model


def compress_context(method: SparseMethod, args, module, query, key, value):
    """A compression method's cache layer after the context, as a job builds it: the context's
    last queries `query` [1, H, w, d] go through the method's attention in prefill phase (the
    compressor records what its press reads: the last queries, their attention's column sums
    and query statistics, here of these w rows only), then the press compresses a pre-sized
    cache of `key` / `value` with room for `args.steps` + 1 more tokens (`kv_cache`, as a job's)
    at its stage (after the context; a query-aware press after the question, here the same
    keys; a decoding press at once). -> the compressed cache layer."""
    from transformers.cache_utils import DynamicCache

    press, compressor = method.press, method.compressor
    compressor.prepare(press_model(args), 1)
    cache = DynamicCache()
    cache.layers = [presized_layer()(key.shape[2] + args.steps + 1)]
    cache.layers[0].update(key, value)
    method.set_phase("decode" if press.stage == "decode" else "prefill")  # when it records
    method.attention(module, query, key, value, None, args.head_dim**-0.5)
    if press.stage == "decode":
        compressor.compress(cache, set(method.config.dense_layers))
        for masker in method.maskers.values():
            masker.reset()
    else:
        method.compress(cache, press.stage)
    method.set_phase("decode")
    return cache.layers[0]


def ops_per_call(fn, *fn_args) -> int:
    """Operator calls (views included, nested ones not) of `fn(*fn_args)`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*fn_args)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def run_size(kv: int, names: list[str], args, device, dtype) -> dict[str, tuple]:
    """{name: (median ms, median ratio to the baseline, fraction of the keys each query head
    attended, operator calls of the last step, (launches, syncs) of the last step, fraction
    of the keys in its cache at the last step)} over `args.steps` decode steps. A compression
    method (a `compression:` section) compresses its cache after the context
    (`compress_context`) and decodes on it, growing by the same keys, while the baselines
    read the full cache."""
    h, hk, d = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(kv)
    n0 = kv + 3

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    key, value = rand(1, hk, n0 - 1, d), rand(1, hk, n0 - 1, d)
    module = types.SimpleNamespace(layer_idx=0, training=False)
    methods = {name: load_method(name, args, args.files, n0 - 1) for name in names}
    for name, method in methods.items():
        if method.compresses and method.press.reconstructs:
            raise SystemExit(f"--methods {name}: its press runs the model to score the cache "
                             f"(KVzip); time it with sa_bench.perf.scale")
    layers = {}  # compression methods: their compressed cache layer, grown by the same steps
    for name, method in methods.items():  # the context: per-layer key caches built once
        if method.compresses:
            window = max(PREFILL_QUERIES, method.press.window())
            layers[name] = compress_context(method, args, module, rand(1, h, min(window, n0 - 1), d), key, value)
        else:
            method.attention(module, rand(1, h, 1, d), key, value, None, d**-0.5)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in ["sdpa", "sdpa_gqa", *names]}
    for step in range(args.steps + 1):  # step 0 warms up and is not counted
        new_key, new_value = rand(1, hk, 1, d), rand(1, hk, 1, d)
        key = torch.cat([key, new_key], 2)
        value = torch.cat([value, new_value], 2)
        caches = {name: layer.update(new_key, new_value) for name, layer in layers.items()}
        query = rand(1, h, 1, d)
        calls = {"sdpa": (sdpa_grouped, (query, key, value)),
                 "sdpa_gqa": (sdpa_gqa, (query, key, value))}
        for name, method in methods.items():
            k, v = caches.get(name, (key, value))
            calls[name] = (method.attention, (module, query, k, v, None, d**-0.5))
        order = list(calls)
        shift = step % len(order)
        for name in order[shift:] + order[:shift]:
            fn, fn_args = calls[name]
            sync()
            start = time.perf_counter()
            fn(*fn_args)
            sync()
            if step:
                times[name].append(time.perf_counter() - start)
    base = times["sdpa"]
    attended = {name: method.stats()["density"]["decode"][0] for name, method in methods.items()}
    kept = {name: (k.nbytes + v.nbytes + methods[name].compressor.stored_bytes()) / (key.nbytes + value.nbytes)
            for name, (k, v) in caches.items()}  # head-wise presses store their kept keys flat
    for method in methods.values():  # counted on the batched paths a GPU takes (no row loops)
        method.gather_costs = BATCHED_GATHER
    ops = {name: ops_per_call(fn, *fn_args) for name, (fn, fn_args) in calls.items()}  # untimed
    work = {name: launches_and_syncs(fn, *fn_args) for name, (fn, fn_args) in calls.items()}
    return {name: (statistics.median(t) * 1e3, statistics.median(x / y for x, y in zip(t, base, strict=True)),
                   attended.get(name, 1.0), ops[name], work[name], kept.get(name, 1.0))
            for name, t in times.items()}


def launches_and_syncs(fn, *fn_args) -> tuple[int, int]:
    """Kernel launches and host syncs of `fn(*fn_args)` (`sa_bench.perf.counts`), counted on a
    second call on the accelerator's paths: the first makes the constants a device caches
    (`Workspace`), as a GPU's earlier steps would have (the timed steps take the CPU's paths)."""
    from sa_bench.attention.ops import accelerator_paths
    from sa_bench.perf.counts import device_work

    with accelerator_paths():
        fn(*fn_args)
    with device_work() as work:
        fn(*fn_args)
    return work.launches, work.syncs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=4, help="timed decode steps per size")
    parser.add_argument("--methods", nargs="+", default=None, help="conf/sparse names (default: all)")
    parser.add_argument("--per-kv-head", action="store_true",
                        help="also time each method with a per_kv_head masker with it set true "
                             "(rows `<name>/kv`: one selection per kv head)")
    parser.add_argument("--ratio", type=float, default=0.75,
                        help="compression methods: the presses' compression_ratio (fraction of "
                             "the context's keys removed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.methods or sorted(p.stem for p in CONF.glob("*.yaml"))
    unknown = [n for n in names if not (CONF / f"{n}.yaml").is_file()]
    if unknown:
        parser.error(f"--methods: no conf/sparse/<name>.yaml for {unknown}")
    if not args.methods:  # all but presses that run the model (KVzip: perf.scale times it)
        names = [n for n in names if not runs_model(n)]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = {}
    tmp = tempfile.TemporaryDirectory()
    args.files = model_files(Path(tmp.name), args.heads, args.kv_heads, args.head_dim)
    if args.per_kv_head:
        names = with_per_kv_head(names)
    for kv in args.keys:
        results[kv] = run_size(kv, names, args, device, dtype)
        base = results[kv]["sdpa"][0]
        print(f"# {kv + 3}..{kv + 3 + args.steps} keys: SDPA grouped {base:.2f} ms", flush=True)
    print(f"\n{args.device} {args.dtype}, {args.threads} thread(s), {args.steps} steps per size; "
          f"ratio = median over steps of method / grouped SDPA in the same step; attended = "
          f"mean fraction of its keys a query head attends ({args.keys[-1] // 1024}k); ops/call = "
          f"operator calls of one decode call on the batched (GPU) paths; launches / syncs = "
          f"non-view operators and host reads of that call, the accelerator's branches forced; "
          f"KV kept = keys in the method's cache over the full cache's at the last step "
          f"(compression methods, --ratio {args.ratio}: attended is of the kept keys)\n")
    print("| method | " + " | ".join(f"{kv // 1024}k keys" for kv in args.keys)
          + " | attended | KV kept | ops/call | launches | syncs |")
    print("|---" * (len(args.keys) + 6) + "|")
    labels = {"sdpa": "SDPA grouped (baseline)", "sdpa_gqa": "SDPA enable_gqa (reference)"}
    for name in ["sdpa", "sdpa_gqa", *names]:
        cells = [f"{results[kv][name][1]:.2f}x ({results[kv][name][0]:.2f} ms)" for kv in args.keys]
        cells.append(f"{100 * results[args.keys[-1]][name][2]:.1f}%")
        cells.append(f"{results[args.keys[-1]][name][5]:.3f}")
        cells.append(str(results[args.keys[-1]][name][3]))
        cells.extend(str(n) for n in results[args.keys[-1]][name][4])
        print(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
