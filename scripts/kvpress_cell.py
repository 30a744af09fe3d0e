"""Does kvpress keep the same positions and give the same answers as a finished cell's press,
on the cell's own model and samples? (docs/results.md, the SmolLM2 section)

    python scripts/kvpress_cell.py CELL_DIR [CELL_DIR ...] [--samples 2]

Each CELL_DIR is a job directory of one press cell (its config.yaml); all must share the
model, benchmark and compression ratio, and each press must have its conf/sparse defaults
(kvpress's, as the parity test compares them). Builds the first samples' context and question
ids as the job does (their digests checked against its predictions.jsonl), runs kvpress's own
pipeline on them in the kvpress venv (scripts/kvpress_cell_side.py; the venv is the one
tests/unit/attention/test_compression_parity.py builds), then the job's prefill / compress /
answer, and prints per sample and press both answers, the (layer, kv head) pairs whose kept
positions are identical, how many of kvpress's kept positions sa_bench drops and adds, and in
how many pairs sa_bench keeps each token of the gold answer where it first occurs in the
context (a needle's digits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from sa_bench.attention.dense import resolve_implementation
from sa_bench.attention.kv_cache import capacity
from sa_bench.benchmarks.base import unique_ids
from sa_bench.models.loading import load_model
from sa_bench.models.prompting import build_request
from sa_bench.perf.attention import method_config
from sa_bench.runner import _answer, _eos_ids, _prefill, input_digest, read_predictions
from sa_bench.spec import JobSpec

VENV = Path(os.environ.get("SA_BENCH_KVPRESS_VENV", Path.home() / ".cache/sa_bench/kvpress-venv"))
SIDE = Path(__file__).with_name("kvpress_cell_side.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    if not (VENV / "bin/python").is_file():
        sys.exit(f"no kvpress venv at {VENV} (SA_BENCH_KVPRESS_VENV): `pytest -m kvpress "
                 f"tests/unit/attention/test_compression_parity.py` builds it")
    configs = [yaml.safe_load((c / "config.yaml").read_text()) for c in args.cells]
    for cfg in configs:
        cfg.pop("cell", None)
    ratio = configs[0]["sparse"]["compression"]["compression_ratio"]
    for cell, cfg in zip(args.cells, configs, strict=True):
        name = cfg["sparse"]["name"]
        if cfg["sparse"]["compression"] != method_config(name, Path(), ratio)["compression"]:
            sys.exit(f"{cell}: sparse.compression differs from conf/sparse/{name}.yaml at ratio "
                     f"{ratio} (kvpress_cell_side.py builds kvpress's defaults)")
        if (cfg["model"], cfg["benchmark"]) != (configs[0]["model"], configs[0]["benchmark"]):
            sys.exit(f"{cell}: another model or benchmark than {args.cells[0]}")
    specs = [JobSpec.from_dict(cfg) for cfg in configs]
    model, tok = load_model(specs[0].model, [])
    bench = specs[0].benchmark
    max_new = specs[0].max_new_tokens or bench.max_new_tokens()
    requests = [build_request(s, tok, specs[0].model.chat_template, specs[0].model.max_context - max_new,
                              specs[0].model.chat_template_kwargs)
                for s in unique_ids(bench.load(tok))[: args.samples]]
    for cell in args.cells:  # the very inputs the cell answered
        done = read_predictions(cell)
        if any(done[r.sample.id]["input"] != input_digest(r) for r in requests if r.sample.id in done):
            sys.exit(f"{cell}: its predictions.jsonl was made from other inputs than rebuilt here")
    print(f"# inputs of {len(requests)} samples rebuilt; their digests match the cells' predictions")
    names = [cfg["sparse"]["name"] for cfg in configs]
    with tempfile.TemporaryDirectory() as tmp:
        job = {"ratio": ratio, "presses": names, "samples": [
            {"id": r.sample.id, "context_ids": r.context_ids, "question_ids": r.question_ids,
             "max_new": max_new} for r in requests]}
        Path(tmp, "in.json").write_text(json.dumps(job))
        subprocess.run([str(VENV / "bin/python"), str(SIDE), model.sa_bench_source["path"],
                        f"{tmp}/in.json", f"{tmp}/out.json"], check=True)
        theirs = json.loads(Path(tmp, "out.json").read_text())
    print(f"# kvpress {theirs['kvpress']} (transformers {theirs['transformers']}) vs sa_bench, "
          f"{specs[0].model.name}, {bench.name}/{bench.subset}, ratio {ratio}")
    device = torch.device("cpu")
    impl = resolve_implementation(specs[0].model.attn_implementation, device, model.dtype)
    eos = _eos_ids(model, tok) | bench.generation.stop_ids(tok)
    for spec, name in zip(specs, names, strict=True):
        method = spec.sparse
        for r in requests:
            room = capacity(len(r.context_ids) + len(r.question_ids), max_new)
            with method.installed(model, impl, tok):
                method.reset()
                cache, n, _ = _prefill(model, method, tuple(r.context_ids), device,
                                       spec.model.prefill_chunk, room)
                method.compress(cache, "context")
                mine = []
                for layer in range(len(cache.layers)):
                    idx, valid = method.compressor.kept[layer]
                    ok = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
                    mine += [set(idx[0, h][ok[0, h]].tolist()) for h in range(idx.shape[1])]
                tokens = _answer(model, method, cache, r.question_ids, max_new, eos, device,
                                 bench.generation, r.context_ids, start=n)
            got = theirs["samples"][r.sample.id][name]
            kv = [set(h) for layer in got["kept"] for h in layer]
            same = sum(a == b for a, b in zip(mine, kv, strict=True))
            dropped = sum(len(b - a) for a, b in zip(mine, kv, strict=True))
            added = sum(len(a - b) for a, b in zip(mine, kv, strict=True))
            where = answer_tokens(tok, r.context_ids, r.sample.answers[0])
            print(f"{r.sample.id} {name}: answers kvpress {got['answer']!r} sa_bench "
                  f"{tok.decode(tokens, skip_special_tokens=True)!r} (gold {r.sample.answers}); "
                  f"identical kept sets in {same}/{len(kv)} (layer, kv head) pairs; of kvpress's "
                  f"{sum(map(len, kv))} kept positions sa_bench drops {dropped}, adds {added}; gold "
                  f"answer's tokens {[tok.decode([r.context_ids[i]]) for i in where]} kept in "
                  f"{[sum(i in h for h in mine) for i in where]} pairs", flush=True)


def answer_tokens(tok: Any, ids: list[int], answer: str) -> list[int]:
    """The context positions of the tokens that make up `answer`'s first occurrence in the
    context decoded token by token (empty when it does not occur)."""
    spans, text = [], ""
    for t in ids:
        piece = tok.decode([t])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    at = text.find(answer)
    if at < 0:
        return []
    return [i for i, (start, end) in enumerate(spans) if end > at and start < at + len(answer)]


if __name__ == "__main__":
    main()
