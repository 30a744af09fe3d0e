"""Parity with NVIDIA kvpress: the positions each press keeps per layer and kv head equal
kvpress's on the same tiny random Llama, Qwen2 and Mistral models (GQA) and random prompt, and
on sa_bench's embedded model (the shipped checkpoint, loaded as is on both sides) and a passkey
prompt in its tokens, at ratios 0.25 / 0.5 / 0.75 (KVzip: global and layer-wise budgets, one
reconstruction chunk and chunks of 128 tokens; both sides prompt with a byte-level tokenizer
without a chat template: for the embedded model, its own). Composed: kvpress's SnapKV keeps
its positions in position order, as sa_bench's presses do (documented in docs/methods.md), so
KNorm after it breaks exact ties alike.

kvpress pins transformers < 5.3, so it runs in its own venv (made once, cached under
~/.cache/sa_bench/kvpress-venv), where tests/unit/attention/kvpress_side.py writes the model and kvpress's
kept positions; this side loads that model with transformers 5 and compares. Skipped, with
the reason shown, when the venv cannot be built (no package index, no disk)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sa_bench.attention import SparseMethod
from sa_bench.attention.kvzip import ByteTokenizer
from sa_bench.benchmarks.passkey import make_prompt
from sa_bench.models.loading import ModelConfig, embedded_dir, load_tokenizer
from sa_bench.runner import _prefill
from tests.conftest import ROOT, build_venv

KVPRESS = "kvpress==0.5.4"
"""The kvpress release compared (its source: github.com/NVIDIA/kvpress, tag v0.5.4)."""
VENV = Path(os.environ.get("SA_BENCH_KVPRESS_VENV", Path.home() / ".cache" / "sa_bench" / "kvpress-venv"))


def kvpress_python() -> Path:
    """The kvpress venv's python, made (torch as here, kvpress with its own pins) if missing."""
    python = VENV / "bin" / "python"
    check = f"import importlib.metadata as m; assert m.version('kvpress') == '{KVPRESS.split('==')[1]}'"
    if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0:
        return python
    return build_venv(VENV, KVPRESS, [KVPRESS], timeout=1200)


EMBEDDED = embedded_dir("tiny-retrieval")
ARCHS = {"llama", "qwen2", "mistral", "embedded"}


def embedded_tokenizer():
    return load_tokenizer(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"))


@pytest.fixture(scope="module")
def theirs(tmp_path_factory) -> tuple[Path, dict]:
    python = kvpress_python()
    out = tmp_path_factory.mktemp("kvpress")
    tok = embedded_tokenizer()  # a passkey prompt of 300 tokens (<s> included), key mid-text
    context, question, _ = make_prompt(random.Random(0), 300, 0.5, lambda t: len(tok(t).input_ids))
    (out / "prompt.txt").write_text(context + question)
    proc = subprocess.run([str(python), str(Path(__file__).with_name("kvpress_side.py")), str(out),
                           str(EMBEDDED), str(out / "prompt.txt")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "kept.json").read_text())
    assert data["embedded_ids"] == tok(context + question).input_ids  # the same tokens here
    return out, data


def model_and_ids(out: Path, data: dict, arch: str):
    """The model kvpress_side.py compressed for `arch` (the embedded one from the package), and
    its prompt."""
    from transformers import AutoModelForCausalLM

    path, ids = (EMBEDDED, data["embedded_ids"]) if arch == "embedded" else (out / arch, data["ids"])
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids


VARIANTS = {"kvzip_layerwise": ("kvzip", {"layerwise": True}),
            "kvzip_chunked": ("kvzip", {"chunk_size": 128})}
"""Presses kvpress_side.py runs with other settings: (config, its compression settings)."""
HEAD_WISE = ("adakv", "critical_adakv", "kvzip", "kvzip_layerwise", "kvzip_chunked")


def ours(model, ids: list[int], name: str, ratio: float, tokenizer) -> list[list[list[int]]]:
    name, settings = VARIANTS.get(name, (name, {}))
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/sparse/{name}.yaml"))
    if name == "composed":  # the ratio of its first press (SnapKV); then KNorm's 0.2
        cfg["compression"]["presses"][0]["compression_ratio"] = ratio
    else:
        cfg["compression"].update(compression_ratio=ratio, **settings)
    method = SparseMethod.from_config(cfg)
    with method.installed(model, tokenizer=tokenizer):
        method.reset()
        cache, _, _ = _prefill(model, method, tuple(ids), torch.device("cpu"))
        method.compress(cache, "context")
        out = []
        for layer in range(len(cache.layers)):
            idx, valid = method.compressor.kept[layer]
            ok = valid if valid is not None else torch.ones_like(idx, dtype=torch.bool)
            out.append([sorted(idx[0, h][ok[0, h]].tolist()) for h in range(idx.shape[1])])
    return out


@pytest.mark.kvpress
def test_kept_positions_equal_kvpress(theirs):
    out, data = theirs
    assert data["kvpress"] == KVPRESS.split("==")[1]
    differ = []
    for arch, presses in sorted(data["kept"].items()):
        model, ids = model_and_ids(out, data, arch)
        # kvpress_side.py's KVzip tokenizer
        tokenizer = embedded_tokenizer() if arch == "embedded" else ByteTokenizer()
        assert set(presses) >= {"random", "knorm", "streaming_llm", "snapkv", "pyramidkv", "tova",
                                "observed_attention", "expected_attention", "keydiff", "lagkv",
                                "adakv", "criticalkv", "critical_adakv", "composed", "kvzip",
                                "kvzip_layerwise", "kvzip_chunked"}
        for name, by_ratio in sorted(presses.items()):
            for ratio, kept in by_ratio.items():
                mine = ours(model, ids, name, float(ratio), tokenizer)
                if name.startswith("kvzip"):  # head-wise over the layers (or each layer)
                    per_layer = [sum(map(len, heads)) for heads in kept]
                    total = data["n"] * len(kept[0]) * (1 - float(ratio))
                    assert (per_layer == [round(total)] * len(kept) if name == "kvzip_layerwise"
                            else sum(per_layer) == round(total * len(kept)))
                for layer, (a, b) in enumerate(zip(mine, kept, strict=True)):
                    for head, (x, y) in enumerate(zip(a, b, strict=True)):
                        kept = data["n"] * (1 - float(ratio)) * (0.8 if name == "composed" else 1)
                        assert len(set(y)) == len(y) and (name in (*HEAD_WISE, "pyramidkv")
                                                          or len(y) == round(kept))
                        if x != y:
                            differ.append(f"{arch} {name} r={ratio} layer {layer} head {head}: "
                                          f"{len(set(x) ^ set(y))} positions differ")
    assert set(data["kept"]) == ARCHS
    assert not differ, "\n".join(differ)


@pytest.mark.kvpress
def test_decoding_keeps_what_kvpress_decoding_press_keeps(theirs):
    """kvpress DecodingPress over KnormPress (interval 4, target 200): the positions kept after
    a question and three tokens are fed after the context, per layer and kv head."""
    out, data = theirs
    dec = data["decoding"]
    assert set(dec["kept"]) == ARCHS
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/decoding.yaml"))
    cfg["compression"].update(compression_interval=dec["compression_interval"], target_size=dec["target_size"])
    for arch, kept in sorted(dec["kept"].items()):
        model, ids = model_and_ids(out, data, arch)
        assert decoded_kept(model, cfg, ids, dec["steps"]) == kept, arch


DECODING_PRESSES = {"snapkv": "SnapKV", "tova": "TOVA", "expected_attention": "ExpectedAttention"}


def decoded_kept(model, cfg: dict, ids: list[int], steps: list[list[int]]) -> list[list[list[int]]]:
    """The positions sa_bench's Decoding keeps per layer and kv head after `steps` are fed
    after the context `ids` (one compression expected)."""
    from sa_bench.models.forward import with_cache

    method = SparseMethod.from_config(cfg)
    with method.installed(model), torch.inference_mode():
        method.reset()
        cache, pos, _ = _prefill(model, method, tuple(ids), torch.device("cpu"))
        method.set_phase("question")
        for step in steps:
            model(input_ids=torch.tensor([step]), **with_cache(model, cache),
                  position_ids=torch.arange(pos, pos + len(step))[None])
            pos += len(step)
            method.step(cache, len(step))
            method.set_phase("decode")
        assert method.stats()["compression"]["compressions"] == 1
        kept = [method.compressor.kept[layer][0] for layer in range(len(cache.layers))]
    return [[sorted(idx[0, h].tolist()) for h in range(idx.shape[1])] for idx in kept]


@pytest.mark.kvpress
def test_decoding_over_query_reading_presses_keeps_what_kvpress_keeps(theirs):
    """kvpress DecodingPress over SnapKV (window 4), TOVA and ExpectedAttention (n_sink 0, its
    future positions moved after the true one: sa_bench's documented difference), reading the
    four passes since the context: the positions kept per layer and kv head."""
    out, data = theirs
    cases = data["decoding_presses"]
    assert set(cases) == set(DECODING_PRESSES)
    differ = []
    for name, case in sorted(cases.items()):
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/decoding.yaml"))
        cfg["compression"].update(compression_interval=case["compression_interval"],
                                  target_size=case["target_size"],
                                  press={"_target_": f"sa_bench.attention.presses.{DECODING_PRESSES[name]}",
                                         **case["press"]})
        assert set(case["kept"]) == ARCHS
        for arch, kept in sorted(case["kept"].items()):
            model, ids = model_and_ids(out, data, arch)
            mine = decoded_kept(model, cfg, ids, case["steps"])
            differ += [f"{name} {arch} layer {layer} head {head}: {len(set(x) ^ set(y))} positions differ"
                       for layer, (a, b) in enumerate(zip(mine, kept, strict=True))
                       for head, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    assert not differ, "\n".join(differ)
