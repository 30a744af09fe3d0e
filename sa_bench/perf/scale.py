"""Time and memory of a job's path at real model shapes, against a plain transformers loop.

    python -m sa_bench.perf.scale --shape llama3.1-8b --layers 1 --tokens 8192 16384 \
        --methods dense streaming oracle_topk [--per-kv-head] [--device cuda]

Builds a random-weight model with the named architecture's shapes (nothing is downloaded),
then for each context length runs, each in a fresh process (so peak memory is its own):

- `plain`: a hand-written transformers loop — `attn_implementation="sdpa"`, the context in
  one forward pass with `logits_to_keep=1`, the question, then greedy tokens;
- every method: the job's own path (`SparseMethod.installed`, the runner's chunked
  `_prefill` and greedy `_answer`, `model.attn_implementation=auto`); methods fitted per model
  (hashattn weights, Double Sparsity calibration) get random files of the model's shapes.

Prints prefill seconds, answer seconds (question + greedy tokens), decode ms per token and
peak memory above the weights and inputs (peak RSS on CPU, `torch.cuda.max_memory_allocated`
on CUDA), each with its ratio to `plain` at the same length; and for the methods, the seconds
spent in attention during prefill (a sparse prefill's estimation included) with its ratio to
the `dense` method's in the same run, and the measured prefill density.

CPU time: beside the wall times of prefill, prefill attention and decode, the CPU seconds of
the measuring process (`time.process_time`) over the same spans. On a CPU with `--threads 1`
the process's CPU time is the work itself, whatever other processes load the machine, while
its wall time grows with their load; there the ratio columns are ratios of CPU time (the table
header says which). With more threads or on CUDA they are ratios of wall time. Sparse prefill:

    python -m sa_bench.perf.scale --tokens 8192 --methods dense vertical_slash block_sparse xattention

KV-cache compression (a press compresses once after the prefill, `--ratio` sets its
compression_ratio as `perf.attention.method_config` does: a decoding press's target size is
that ratio's kept count of the context): the KV bytes kept after compression over before, the decode step's ratio
to the `dense` method's, and the compression's seconds (scoring + gather) with its ratio to the
prefill; and the decode step's attention calls alone (ms per token, and the ratio to `dense`'s),
which is what compression shrinks — the step also reads the layer's MLP and the lm_head, the
same bytes for every method:

    python -m sa_bench.perf.scale --tokens 16384 --ratio 0.75 --methods dense snapkv knorm expected_attention

A method named `NAME:key=value,...` runs conf/sparse/NAME.yaml with those `prefill` settings
(e.g. `block_sparse:top_k=26` for ~10% density at 8k tokens); docs/performance.md has the
settings and the table at ~10% density. `--skip-plain` leaves out the plain loop (its
ratio columns then show '-'), e.g. for a long run that needs only the ratios to `dense`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[2] / "conf" / "sparse"

SHAPES: dict[str, dict[str, Any]] = {
    "llama3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, max_position_embeddings=131072),
    "mistral-7b": dict(arch="mistral", hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=32768,
                       sliding_window=None),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=65536),
}


def build_model(shape: str, layers: int, vocab: int | None, device: str, dtype: str,
                attn_implementation: str = "sdpa") -> Any:
    """A random-weight causal LM with `shape`'s dimensions and `layers` layers."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    spec = dict(SHAPES[shape])
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[spec.pop("arch")]
    if vocab:
        spec["vocab_size"] = vocab
    config = config_cls(num_hidden_layers=layers, **spec)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # made in its dtype on its device: an 8B
    try:  # model built in float32 first would need 32 GB before the cast
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _rss() -> int:
    """Current resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Memory:
    """Peak memory of what follows `start()`, above what was in use at `start()`."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self.base = _rss()

    def peak_above_start(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _peak_rss() - self.base


def run_one(args: argparse.Namespace, method_name: str, tokens: int) -> dict[str, float]:
    """One measurement in this process: prefill, question + greedy answer, peak memory."""
    import torch

    from sa_bench.models.forward import synchronize, with_cache
    from sa_bench.runner import _answer, _prefill, _rewind

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain = method_name == "plain"
    model = build_model(args.shape, args.layers, args.vocab, args.device, args.dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(tokens)
    context = torch.randint(0, vocab, (tokens,), generator=g).tolist()
    question = torch.randint(0, vocab, (args.question,), generator=g).tolist()
    memory = Memory(device)
    memory.start()
    start = DecodeStart(device)
    if plain:
        from transformers import DynamicCache

        def answer(cache, n):
            out = []
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([question], device=device),
                               **with_cache(model, cache)).logits
                start()
                while True:
                    out.append(int(logits[0, -1].argmax()))
                    if len(out) >= n:
                        break
                    logits = model(input_ids=torch.tensor([[out[-1]]], device=device),
                                   **with_cache(model, cache)).logits
            return out

        t0, c0 = time.perf_counter(), time.process_time()
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([context], device=device), **with_cache(model, cache))
        synchronize(device)
        prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        timed = _timed_answers(lambda n: answer(cache, n), lambda: _rewind(cache, tokens), device,
                               args.new, start)
        peak = memory.peak_above_start()
        return {"prefill_s": prefill, "prefill_cpu_s": prefill_cpu, **timed, "peak_bytes": peak}

    from sa_bench.attention.dense import resolve_implementation
    from sa_bench.attention.files import model_shapes
    from sa_bench.attention.kv_cache import capacity as kv_capacity
    from sa_bench.attention.kvzip import ByteTokenizer
    from sa_bench.attention.method import SparseMethod
    from sa_bench.perf.attention import method_config, model_files

    layers, heads, kv_heads, head_dim = model_shapes(model.config)
    files = model_files(Path(tempfile.mkdtemp()), heads, kv_heads, head_dim, layers)
    config = with_prefill_settings(method_name, method_config, files, args.ratio, tokens)
    method = SparseMethod.from_config(config)
    implementation = resolve_implementation("auto", device, model.dtype)
    attention_s = [0.0, 0.0]  # wall, CPU
    decode_attention: list[list[float]] = []  # per answer: its decode steps' attention calls
    phase = ["prefill"]
    timed_attention = method.attention

    def attention(*a, **kw):  # every attention call, timed
        t0, c0 = time.perf_counter(), time.process_time()
        out = timed_attention(*a, **kw)
        synchronize(device)
        spent = time.perf_counter() - t0, time.process_time() - c0
        for total in [attention_s] + (decode_attention[-1:] if phase[0] == "decode" else []):
            total[0] += spent[0]
            total[1] += spent[1]
        return out

    method.attention = attention
    with method.installed(model, implementation, ByteTokenizer()):  # random ids: no tokenizer
        c0 = time.process_time()
        cache, n_ctx, prefill = _prefill(model, method, tuple(context), device, args.chunk,
                                         kv_capacity(tokens + args.question, args.new))
        prefill_cpu = time.process_time() - c0
        prefill_attention, prefill_attention_cpu = attention_s  # the answers run through it too
        density = method.stats()["density"]["prefill"]
        kv_before = sum(e.keys.nbytes + e.values.nbytes for e in cache.layers)
        t0, c0 = time.perf_counter(), time.process_time()
        method.compress(cache, "context")  # a press: once, after the context's prefill
        synchronize(device)
        compress_s, compress_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        kv_after = sum(e.keys.nbytes + e.values.nbytes for e in cache.layers) + (
            method.compressor.stored_bytes() if method.compresses else 0)  # head-wise: stored flat
        saved = method.snapshot(cache) if method.compresses else None
        set_phase = method.set_phase

        def marking(name: str) -> None:  # the answer's decoding begins
            set_phase(name)
            phase[0] = name
            if name == "decode":
                decode_attention.append([0.0, 0.0])
                start()

        method.set_phase = marking
        timed = _timed_answers(
            lambda n: _answer(model, method, cache, question, n, set(), device, start=n_ctx),
            (lambda: method.restore(cache, saved)) if saved else (lambda: _rewind(cache, n_ctx)),
            device, args.new, start)
        peak = memory.peak_above_start()
    values = [d for d in density if d is not None]
    steps = max(args.new - 1, 1)  # the first answer's (`new` tokens) decode steps
    return {"decode_attention_ms": decode_attention[0][0] / steps * 1e3,
            "decode_attention_cpu_ms": decode_attention[0][1] / steps * 1e3,
            "prefill_s": prefill, "prefill_cpu_s": prefill_cpu, **timed, "peak_bytes": peak,
            "prefill_attention_s": prefill_attention, "prefill_attention_cpu_s": prefill_attention_cpu,
            "prefill_density": sum(values) / len(values) if values else -1.0,
            "kv_kept": kv_after / kv_before, "compress_s": compress_s, "compress_cpu_s": compress_cpu_s}


def with_prefill_settings(name: str, method_config, files: Path, ratio: float | None = None,
                          context: int | None = None) -> dict:
    """`NAME:key=value,key=value`: conf/sparse/NAME.yaml with those `prefill` values (YAML
    scalars), e.g. `block_sparse:top_k=26` or `xattention:threshold=0.3` for a chosen density;
    a press's ratio set to `ratio` as `method_config` sets it (per-layer ratios, a decoding
    press's target size for a `context`-token cache)."""
    import yaml

    base, _, settings = name.partition(":")
    config = method_config(base, files, ratio, context)
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or config.get("prefill") is None:
            raise SystemExit(f"{name}: expected NAME:key=value,... on a method with a prefill section")
        config["prefill"][key] = yaml.safe_load(value)
    return config


class DecodeStart:
    """Called when an answer's question pass is done: the (wall, CPU) time its token-by-token
    decoding began, so decode ms/token is timed over the decode steps alone (a difference of
    two answers' times carried their question passes' noise and could come out negative)."""

    def __init__(self, device) -> None:
        self.device, self.at = device, (0.0, 0.0)

    def __call__(self) -> None:
        from sa_bench.models.forward import synchronize

        synchronize(self.device)
        self.at = time.perf_counter(), time.process_time()


def _timed_answers(answer, rewind, device, new: int, start: DecodeStart) -> dict[str, float]:
    """Answer seconds for `new` tokens and for one token (the question pass alone), and decode
    ms per token (wall and CPU) over the `new`-token answer's steps after `start`."""
    from sa_bench.models.forward import synchronize

    times, cpu, decode = {}, {}, (0.0, 0.0)
    for n in (new, 1):
        t0, c0 = time.perf_counter(), time.process_time()
        got = answer(n)
        synchronize(device)
        times[n], cpu[n] = time.perf_counter() - t0, time.process_time() - c0
        if n == new:
            decode = t0 + times[n] - start.at[0], c0 + cpu[n] - start.at[1]
        assert len(got) == n
        rewind()
    steps = max(new - 1, 1)
    return {"answer_s": times[new], "answer_cpu_s": cpu[new], "question_s": times[1],
            "decode_ms": decode[0] / steps * 1e3, "decode_cpu_ms": decode[1] / steps * 1e3}


def _child(args: argparse.Namespace, method: str, tokens: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "sa_bench.perf.scale", "--child", method, str(tokens),
           "--shape", args.shape, "--layers", str(args.layers), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--question", str(args.question),
           "--new", str(args.new), "--chunk", str(args.chunk or 0), "--repeat", "1"]
    if args.ratio is not None:
        cmd += ["--ratio", str(args.ratio)]
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The minimum of each figure over the runs that succeeded (else the first error)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {key: min(r[key] for r in ok) for key in ok[0]}


def _ratio(run: dict[str, Any], base: dict[str, Any], key: str) -> str:
    """`run[key]` as a ratio to `base[key]`, '-' where the base has no figure."""
    if "error" in base or base.get(key, 0) <= 0:
        return "-"
    return f"{run[key] / base[key]:.2f}x"


def cpu_clock(args: argparse.Namespace) -> bool:
    """Whether the ratios are of CPU time: one thread on a CPU (see the module doc)."""
    return args.threads == 1 and args.device == "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["dense", "streaming", "oracle_topk"],
                        help="conf/sparse names, or 'all'")
    parser.add_argument("--per-kv-head", action="store_true",
                        help="also run each method with a per_kv_head masker with it set true "
                             "(rows `<name>/kv`)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    parser.add_argument("--question", type=int, default=64, help="question tokens")
    parser.add_argument("--new", type=int, default=16, help="greedy tokens generated")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (0: one pass)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure plain and every method this many times, alternately; "
                             "each figure is the minimum")
    parser.add_argument("--ratio", type=float, default=None,
                        help="compression_ratio of the methods that compress the KV cache")
    parser.add_argument("--skip-plain", action="store_true",
                        help="leave out the plain transformers loop (no ratios to plain)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.chunk = args.chunk or None
    if args.child:
        print(json.dumps(run_one(args, args.child[0], int(args.child[1]))))
        return
    methods = sorted(p.stem for p in CONF.glob("*.yaml")) if args.methods == ["all"] else args.methods
    if args.per_kv_head:
        from sa_bench.perf.attention import with_per_kv_head

        methods = with_per_kv_head(methods)
    print(f"# {args.shape}, {args.layers} layer(s), {args.dtype} on {args.device}, "
          f"{args.threads} thread(s); question {args.question} tokens, {args.new} new tokens, "
          f"prefill chunk {args.chunk}; plain = transformers sdpa loop, one-pass prefill", flush=True)
    cpu = cpu_clock(args)
    print(f"# ratio columns: {'CPU time of each process (1 thread)' if cpu else 'wall time'}; "
          "prefill s, prefill attention s and decode ms/token are wall time, each with its CPU "
          "time beside it", flush=True)
    print("\n| tokens | method | prefill s | prefill CPU s | ratio | answer s | ratio | "
          "decode ms/token | decode CPU ms/token | peak MiB above weights | ratio | "
          "prefill attention s | prefill attention CPU s | ratio to dense | prefill ratio to dense | "
          "prefill density | "
          "decode ratio to dense | KV kept | compression s | ratio to prefill | "
          "decode attention ms/token | decode attention CPU ms/token | ratio to dense |")
    print("|---" * 23 + "|")
    names = methods if args.skip_plain else ["plain", *methods]
    skipped = {"error": "not run"}
    for tokens in args.tokens:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(args.repeat):  # each run's row printed as it ends (a timeout keeps them)
            for name in results:
                results[name].append(_child(args, name, tokens))
                label = name if args.repeat == 1 else f"{name} (run {i + 1})"
                _print_row(tokens, label, results[name][-1], (results.get("plain") or [skipped])[-1],
                           (results.get("dense") or [skipped])[-1], cpu)
        if args.repeat > 1:
            best = {name: _best(runs) for name, runs in results.items()}
            for name, r in best.items():
                _print_row(tokens, f"{name} (best)", r, best.get("plain", skipped),
                           best.get("dense", skipped), cpu)


def _print_row(tokens: int, name: str, r: dict[str, Any], base: dict[str, Any],
               dense: dict[str, Any], cpu: bool) -> None:
    """One table row; time ratios of CPU time where `cpu` (else wall), memory of peak bytes."""
    if "error" in r:
        print(f"| {tokens} | {name} | failed: {r['error']} ||||||||||||||||||||||", flush=True)
        return
    clock = "_cpu" if cpu else ""
    mib = r["peak_bytes"] / 2**20
    attention = (f"{r['prefill_attention_s']:.2f} | {r['prefill_attention_cpu_s']:.2f} | "
                 f"{_ratio(r, dense, f'prefill_attention{clock}_s')} | "
                 f"{_ratio(r, dense, f'prefill{clock}_s')} | "
                 f"{r['prefill_density']:.3f} | {_ratio(r, dense, f'decode{clock}_ms')} | "
                 f"{r['kv_kept']:.3f} | {r['compress_s']:.3f} | "
                 f"{r[f'compress{clock}_s'] / r[f'prefill{clock}_s']:.3f}x | "
                 f"{r['decode_attention_ms']:.1f} | {r['decode_attention_cpu_ms']:.1f} | "
                 f"{_ratio(r, dense, f'decode_attention{clock}_ms')}"
                 if "prefill_attention_s" in r else " | ".join("-" * 12))
    print(f"| {tokens} | {name} | {r['prefill_s']:.2f} | {r['prefill_cpu_s']:.2f} | "
          f"{_ratio(r, base, f'prefill{clock}_s')} | {r['answer_s']:.2f} | "
          f"{_ratio(r, base, f'answer{clock}_s')} | {r['decode_ms']:.1f} | {r['decode_cpu_ms']:.1f} | "
          f"{mib:.0f} | {_ratio(r, base, 'peak_bytes')} | {attention} |", flush=True)


if __name__ == "__main__":
    main()
