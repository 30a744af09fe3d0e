"""Evaluate one cell: prefill each context once, answer each of its questions greedily from
that cache with the sparse method active, append every answer to `predictions.jsonl` as it
is produced, then score and write the result files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sa_bench
from sa_bench.benchmarks.base import Generation, next_token, unique_ids
from sa_bench.launch import jobdir
from sa_bench.launch.pool import Lease
from sa_bench.launch.progress import write_progress
from sa_bench.models.forward import synchronize, with_cache
from sa_bench.models.prompting import Request, build_request
from sa_bench.spec import JobSpec


def read_predictions(path: Path) -> dict[str, dict]:
    """Finished samples of an earlier attempt; a torn last line is cut off the file."""
    file = path / jobdir.PREDICTIONS
    if not file.exists():
        return {}
    data = file.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(file, "r+b") as f:
            f.truncate(end)
    records = {}
    for number, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                records[record["id"]] = record
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(
                    f"{file} line {number}: expected a JSON prediction record with an 'id' "
                    f"({type(exc).__name__}: {exc}); delete that line to redo its sample"
                ) from None
    return records


def input_digest(request: Request) -> str:
    """Hash of a sample's model input (context and question tokens) and gold answers."""
    h = hashlib.sha256(array("q", request.context_ids).tobytes())
    h.update(b"|" + array("q", request.question_ids).tobytes() + b"|")
    h.update(json.dumps(request.sample.answers, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def reusable(earlier: dict[str, dict], digests: dict[str, str]) -> dict[str, dict]:
    """The earlier predictions made for the very samples now loaded (same id, same input and
    answers): a resumed cell whose data changed under the same key redoes those samples
    instead of scoring old predictions against new samples."""
    return {i: rec for i, rec in earlier.items() if i in digests and rec.get("input") == digests[i]}


def evaluate(spec: JobSpec, path: Path, lease: Lease, weights: str | None = None) -> dict[str, Any]:
    """Run the cell `spec` in `path` on the leased devices; `weights` is the weights identity
    its job key holds (recorded in env.json, so a report compares like with like)."""
    import torch
    from transformers.utils import logging as hf_logging

    from sa_bench.attention.dense import resolve_implementation
    from sa_bench.attention.kv_cache import capacity as kv_capacity
    from sa_bench.attention.prefill import check_kernel
    from sa_bench.models.loading import go_offline, hub_offline, load_model, load_tokenizer

    hf_logging.disable_progress_bar()  # one bar per job would drown the sweep's own progress
    torch.manual_seed(spec.seed)
    started = time.time()
    reset_peak_memory(lease.torch_devices)  # a reused worker would report an earlier job's peak
    prefill = getattr(spec.sparse, "prefill", None)
    if prefill is not None:  # before the data and weights load
        check_kernel(prefill.kernel, bool(lease.torch_devices), spec.model.dtype,
                     "sparse.prefill.kernel")
    bench = spec.benchmark
    if spec.model.source() == "hub" and hub_offline():
        go_offline()  # no retries: an uncached tokenizer fails at once (the fallback has one)
    try:  # the data first (a bad row is named before the weights load), with the tokenizer alone
        samples = unique_ids(bench.load(load_tokenizer(spec.model)))
    except OSError:  # the hub's tokenizer is out of reach: the model's offline fallback has one
        samples = None
    model, tokenizer = load_model(spec.model, lease.torch_devices)
    loaded = time.time()
    if samples is None:
        samples = unique_ids(bench.load(tokenizer))
    if not samples:
        raise ValueError(f"benchmark {bench.name}/{bench.subset}: no samples were loaded")
    max_new = spec.max_new_tokens or bench.max_new_tokens()
    max_prompt = spec.model.max_context - max_new
    if max_prompt < 16:
        raise ValueError(f"model.max_context={spec.model.max_context} leaves no room for a prompt "
                         f"after {max_new} generated tokens")
    requests = [
        build_request(s, tokenizer, spec.model.chat_template, max_prompt,
                      spec.model.chat_template_kwargs)
        for s in samples
    ]
    digests = {r.sample.id: input_digest(r) for r in requests}
    earlier = read_predictions(path)
    finished = reusable(earlier, digests)
    method = spec.sparse
    device = next(model.parameters()).device
    implementation = resolve_implementation(spec.model.attn_implementation, device, model.dtype)
    chunk = spec.model.prefill_chunk
    eos = _eos_ids(model, tokenizer) | bench.generation.stop_ids(tokenizer)
    timing = {"prefill_s": 0.0, "compress_s": 0.0, "answer_s": 0.0, "generated_tokens": 0, "samples_run": 0}
    write_progress(path, len(finished), len(requests))
    # one capacity for every context of the cell: the allocator reuses the same blocks
    capacity = kv_capacity(max(len(r.context_ids) + len(r.question_ids) for r in requests), max_new)
    with method.installed(model, implementation, tokenizer), open(path / jobdir.PREDICTIONS, "a") as out:
        for context_ids, group in _by_context(requests).items():
            todo = [r for r in group if r.sample.id not in finished]
            if not todo:
                continue
            method.reset()
            cache, ctx_len, t = _prefill(model, method, context_ids, device, chunk, capacity)
            timing["prefill_s"] += t
            t0 = time.perf_counter()
            method.compress(cache, "context")  # once per context (a press without query_aware)
            saved = method.snapshot(cache) if method.compresses else None
            synchronize(device)
            timing["compress_s"] += time.perf_counter() - t0
            for request in todo:
                t0 = time.perf_counter()
                tokens = _answer(model, method, cache, request.question_ids, max_new, eos, device,
                                 bench.generation, context_ids, start=ctx_len)
                if saved is None:
                    _rewind(cache, ctx_len)
                else:  # the compressed context as it was, bit for bit (answer tokens removed)
                    method.restore(cache, saved)
                synchronize(device)
                timing["answer_s"] += time.perf_counter() - t0
                timing["generated_tokens"] += len(tokens)
                timing["samples_run"] += 1
                record = {
                    "id": request.sample.id,
                    "prediction": tokenizer.decode(tokens, skip_special_tokens=True),
                    "answers": request.sample.answers,
                    "prompt_tokens": len(context_ids) + len(request.question_ids),
                    "truncated": request.truncated,
                    "input": digests[request.sample.id],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                finished[record["id"]] = record
                write_progress(path, len(finished), len(requests))
    predictions = [finished[r.sample.id]["prediction"] for r in requests]
    metrics = bench.score(samples, predictions)
    jobdir.write_json_atomic(path / jobdir.METRICS, metrics)
    stats = {
        "n_samples": len(requests),
        "samples_digest": hashlib.sha256("".join(digests.values()).encode()).hexdigest()[:16],
        "stale_predictions_redone": sum(1 for i in earlier if i in digests and i not in finished),
        "truncated_samples": sum(r.truncated for r in requests),
        "max_prompt_tokens": max(len(r.context_ids) + len(r.question_ids) for r in requests),
        "max_new_tokens": max_new,
        "load_s": loaded - started,
        "total_s": time.time() - started,
        **timing,
        **peak_memory(lease.torch_devices),
        "lease": {"devices": lease.devices, "simulated": lease.simulated,
                  "acquired": lease.acquired, "released": time.time(), "waited_s": lease.waited},
        "attention": {**method.stats(), "implementation": implementation,
                      "prefill_chunk": chunk},
    }
    jobdir.write_json_atomic(path / jobdir.STATS, stats)
    env = environment(device)
    env["model_source"] = getattr(model, "sa_bench_source", None)  # hub, local dir or fallback
    env["weights"] = weights
    jobdir.write_json_atomic(path / jobdir.ENV, env)
    return {"score": metrics.get("score")}


def _by_context(requests: list[Request]) -> OrderedDict[tuple[int, ...], list[Request]]:
    groups: OrderedDict[tuple[int, ...], list[Request]] = OrderedDict()
    for request in requests:
        groups.setdefault(tuple(request.context_ids), []).append(request)
    return groups


def _prefill(model: Any, method: Any, context_ids: tuple[int, ...], device: Any,
             chunk: int | None = None, capacity: int | None = None):
    """Fill a new cache with the context, `chunk` tokens per forward pass (None: one pass);
    only the last position's logits are computed. The cache's full-attention layers hold
    `capacity` positions without growing (`sa_bench.attention.kv_cache`; None: the context's
    length, grown by doubling past it). Returns (cache, context length, seconds)."""
    import torch

    from sa_bench.attention.kv_cache import presized_cache

    t0 = time.perf_counter()
    cache = presized_cache(model.config, capacity or len(context_ids))
    method.set_phase("prefill")
    ids = torch.tensor([context_ids], device=device)
    step = chunk or max(len(context_ids), 1)
    with torch.inference_mode():
        for start in range(0, len(context_ids), step):
            model(input_ids=ids[:, start:start + step], **with_cache(model, cache))
    _keep_context_state(cache)
    synchronize(device)
    return cache, len(context_ids), time.perf_counter() - t0


def _rewind(cache: Any, length: int) -> None:
    """Drop the question and answer tokens so the next question starts from the context.

    A full-attention layer is cropped back to `length` keys. A layer that cannot be cropped
    (a sliding-window layer past its window, a linear-attention / state-space layer: its
    state has no per-token history) is restored from the copy `_prefill` kept of it, itself
    copied again so every question starts from the same state."""
    saved = getattr(cache, "sa_bench_context_state", None)
    if saved is None:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)
        return
    for i, state in enumerate(saved):
        if state is not None:
            cache.layers[i] = _copied(state)
        elif (extra := cache.layers[i].get_seq_length() - length) > 0:
            cache.layers[i].crop(-extra)


def _keep_context_state(cache: Any) -> None:
    """After the context's prefill: a copy of the state of every layer that is not a plain
    full-attention layer (None for those: `crop` rewinds them), for `_rewind`. None at all
    when every layer is plain (no copy)."""
    from sa_bench.attention.kv_cache import is_plain

    saved = [None if is_plain(layer) else _copied(layer) for layer in cache.layers]
    cache.sa_bench_context_state = None if all(s is None for s in saved) else saved


def _copied(obj: Any) -> Any:
    """A copy of a cache layer whose tensors (also in lists and dicts) are cloned: a window's
    keys are a view of a larger tensor, so the copy holds only the window."""
    import copy

    import torch

    def clone(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, list):
            return [clone(v) for v in value]
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        return value

    new = copy.copy(obj)
    for name, value in vars(obj).items():
        setattr(new, name, clone(value))
    return new


def _answer(model: Any, method: Any, cache: Any, question_ids: list[int], max_new: int,
            eos: set[int], device: Any, generation: Generation | None = None,
            context_ids: Sequence[int] = (), start: int | None = None) -> list[int]:
    """Greedy decoding: the question tokens, then one token at a time until EOS or max_new,
    each step under the benchmark's `generation` settings (over context, question, answer).
    `start`: the true position of the first question token, fed as `position_ids` (a
    compressed cache holds fewer positions than were prefilled); None: the cache's length.
    A query-aware press compresses the cache after the question."""
    import torch

    tokens: list[int] = []
    position = [start]

    def feed(ids: list[int]) -> Any:
        kwargs = with_cache(model, cache)
        if position[0] is not None:
            kwargs["position_ids"] = torch.arange(position[0], position[0] + len(ids),
                                                  device=device).unsqueeze(0)
            position[0] += len(ids)
        logits = model(input_ids=torch.tensor([ids], device=device), **kwargs).logits
        method.step(cache, len(ids))  # a press compressing while decoding (kvpress DecodingPress)
        return logits

    method.set_phase("question")
    with torch.inference_mode():
        logits = feed(question_ids)
        method.compress(cache, "question")
        method.set_phase("decode")
        while True:
            token = next_token(logits[0, -1], generation or Generation(), context_ids,
                               question_ids, tokens, stop=eos, n_new=len(tokens))
            if token in eos:
                break
            tokens.append(token)
            if len(tokens) >= max_new:
                break
            logits = feed([token])
    return tokens


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


def reset_peak_memory(devices: Sequence[int]) -> None:
    """Start this job's peak-memory count: on every leased GPU, else the process's peak RSS
    (Linux resets it through /proc/self/clear_refs; elsewhere it stays the process's)."""
    import torch

    if devices:
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(devices: Sequence[int]) -> dict[str, Any]:
    """`peak_memory_bytes`: the largest peak over the leased GPUs (what decides an out-of-
    memory), with every GPU's own in `peak_memory_bytes_per_device`; on CPU the peak RSS."""
    import torch

    if devices:
        per = {str(d): int(torch.cuda.max_memory_allocated(d)) for d in devices}
        return {"peak_memory_bytes": max(per.values()), "peak_memory_bytes_per_device": per}
    return {"peak_memory_bytes": _peak_rss()}


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # reset by reset_peak_memory, unlike ru_maxrss
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hydra": _version("hydra-core"),
        "omegaconf": _version("omegaconf"),
        "datasets": _version("datasets"),
        "sa_bench": sa_bench.__version__,
        "sa_bench_git_commit": _git_commit(),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(sa_bench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
