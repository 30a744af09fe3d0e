"""hashattn weights file format, the training and calibration commands (tiny random Llama)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sa_bench.attention import SparseMethod, calibrate_ds, train_hashattn  # noqa: E402
from sa_bench.attention.capture import capture, token_windows  # noqa: E402
from sa_bench.attention.hashattn import HashWeights  # noqa: E402
from sa_bench.config import ConfigError  # noqa: E402
from sa_bench.models.loading import embedded_dir  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=300)  # head_dim 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(path)
    return path


def hash_cfg(weights, heavy=0.2):
    return {"name": "h", "maskers": {"hash": {"_target_": "sa_bench.attention.hashattn.HashAttention",
                                              "heavy_size": heavy, "weights": str(weights)}}}


def test_weights_round_trip(tmp_path):
    w = HashWeights.init(layers=2, heads=2, head_dim=16, bits=8, hidden=(12, 10), seed=1)
    w.save(tmp_path / "w.safetensors")
    back = HashWeights.load(tmp_path / "w.safetensors", "k")
    assert len(back.layers) == 2 and back.activation == "silu"
    for lay in range(2):
        for side in ("query", "key"):
            assert len(back.layers[lay][side]) == 3
            for (wa, ba), (wb, bb) in zip(w.layers[lay][side], back.layers[lay][side], strict=True):
                assert torch.equal(wa, wb) and torch.equal(ba, bb)
    back.check(2, 4, 2, 16, "k")
    x = torch.randn(1, 2, 5, 16)
    assert torch.equal(back.project("key", 1, x), w.project("key", 1, x))


def test_shape_mismatch_is_refused(tmp_path, tiny, install):
    HashWeights.init(layers=2, heads=2, head_dim=32, bits=8).save(tmp_path / "wrong.safetensors")
    method = SparseMethod.from_config(hash_cfg(tmp_path / "wrong.safetensors"))
    model = LlamaForCausalLM.from_pretrained(tiny)
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.hash\.weights: layer 0 query linear 0 has "
                                          r"weight \[2, 32, 64\] and bias \[2, 64\]; expected \[2, 16, out\]"):
        install(method, model)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="is not a sa_bench.hashattn.v2 file"):
        install(SparseMethod.from_config(hash_cfg(tmp_path / "other.safetensors")), model)


def test_train_hashattn_writes_usable_weights(tmp_path, tiny, capsys, install):
    """On the embedded model (peaked attention: a random model's is flat, any top keys hold the
    same mass) training raises the share of attention mass the hashed top keys capture."""
    import re

    out = tmp_path / "hash.safetensors"
    train_hashattn.main(["--model", "embedded:tiny-retrieval", "--out", str(out), "--text", "passkey",
                         "--max-tokens", "512", "--samples", "2", "--steps", "40", "--bits", "16",
                         "--hidden", "32"])
    printed = capsys.readouterr().out
    gains = re.findall(r"layer \d: top-0.1 attention-mass recall ([\d.]+) -> ([\d.]+)", printed)
    assert len(gains) == 2 and all(float(after) > float(before) for before, after in gains), printed
    w = HashWeights.load(out, "k")
    w.check(2, 4, 2, 32, "k")
    assert (w.bits, w.hash_heads, len(w.layers[0]["query"])) == (16, 2, 2)  # per kv head, 1 hidden
    method = SparseMethod.from_config(hash_cfg(out))
    model = LlamaForCausalLM.from_pretrained(embedded_dir("tiny-retrieval")).eval()
    install(method, model)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 250, (1, 140))
    with torch.no_grad():
        model(ids[:, :120], past_key_values=cache)
        method.set_phase("question")
        model(ids[:, 120:140], past_key_values=cache)
    stats = method.stats()
    assert stats["notes"] == [f"hashattn: learned signatures from {out} (16 bits, 2 hash heads)"]
    assert all(abs(d - 0.2) < 0.01 for d in stats["density"]["question"])


def test_calibrate_ds_writes_channel_ranks(tmp_path, tiny, install):
    out = tmp_path / "ds.safetensors"
    calibrate_ds.main(["--model", str(tiny), "--out", str(out), "--max-tokens", "128"])
    rank = load_file(str(out))["channel_rank"]
    assert rank.shape == (2, 4, 16)
    assert torch.equal(rank.sort(-1).values, torch.arange(16).expand(2, 4, 16))
    # the authors' "qk" statistic: mean over tokens of |q_c k_c|, each token against its own key
    seen = capture(LlamaForCausalLM.from_pretrained(tiny).eval(), token_windows(str(tiny), None, 128, 1, 300))
    for layer in range(2):
        q, k = seen[layer][0]
        stat = (q * k.repeat_interleave(2, 0)).abs().mean(1)  # [H, d]
        assert torch.equal(rank[layer], stat.argsort(-1, descending=True))
    cfg = {"name": "ds", "maskers": {"ds": {"_target_": "sa_bench.attention.double_sparsity.DoubleSparsity",
                                            "heavy_size": 0.1, "channels": 4,
                                            "calibration": str(out)}}}
    method = SparseMethod.from_config(cfg)
    model = LlamaForCausalLM.from_pretrained(tiny).eval()
    install(method, model)
    assert method.stats()["notes"] == [f"double_sparsity: channels from {out}, 4-bit labels"]
    bad = dict(SMALL, num_attention_heads=8, num_key_value_heads=4, hidden_size=128)
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.ds\.calibration: channel_rank has shape"):
        install(SparseMethod.from_config(cfg), LlamaForCausalLM(LlamaConfig(**bad)))


def test_capture_sees_causal_queries_and_keys_and_leaves_no_registration(tiny):
    """Layer 1's keys depend on layer 0's (causal) attention: captured keys equal the KV cache
    of a plain forward pass; the capture's attention function is unregistered afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = LlamaForCausalLM.from_pretrained(tiny).eval()
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(0))
    seen = capture(model, [ids])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for layer in range(2):
        torch.testing.assert_close(seen[layer][0][1], cache.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
    assert "sa_bench_capture" not in AttentionInterface._global_mapping
    assert "sa_bench_capture" not in AttentionMaskInterface._global_mapping
    assert model.config._attn_implementation != "sa_bench_capture"


def test_perf_attention_decodes_compression_methods_on_their_compressed_cache(capsys):
    from sa_bench.perf.attention import main

    main(["--keys", "400", "--steps", "2", "--methods", "knorm", "snapkv", "streaming", "--ratio", "0.75",
          "--heads", "4", "--kv-heads", "2", "--head-dim", "16"])
    header, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
                     if line.startswith("| ") and "---" not in line]
    kept = {row[0]: float(row[header.index("KV kept")]) for row in rows}
    # 403 context keys -> ceil(0.25 * 403) = 101 kept, then 3 appended (warm-up + 2 steps): 104 / 406
    assert kept["knorm"] == kept["snapkv"] == pytest.approx(1 - 0.75, abs=0.01)
    assert kept["SDPA grouped (baseline)"] == kept["streaming"] == 1.0  # decode masker: full cache


def test_perf_attention_leaves_out_presses_that_run_the_model():
    """KVzip scores the cache with forward passes of the model, which perf.attention (attention
    calls only) does not have: left out of the default list, refused by name."""
    from sa_bench.perf.attention import main, runs_model

    assert runs_model("kvzip") and not runs_model("snapkv") and not runs_model("dense")
    with pytest.raises(SystemExit, match="--methods kvzip: its press runs the model"):
        main(["--keys", "100", "--steps", "1", "--methods", "kvzip", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "16"])
