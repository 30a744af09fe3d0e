"""The scale perf command runs the job's path and the plain loop and prints one row each
(figures themselves are not asserted: they come from the command, not from tests)."""

from sa_bench.perf import scale


def test_scale_command_prints_every_method(capsys):
    scale.main(["--shape", "tiny", "--tokens", "300", "--methods", "dense", "streaming", "quest",
                "block_sparse", "--chunk", "128", "--question", "8", "--new", "3", "--per-kv-head"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 300 |")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "plain", "dense", "streaming", "quest", "block_sparse", "quest/kv"]  # only quest has a per_kv_head masker
    assert "failed" not in out
    # three ratios to plain; the methods' prefill attention and decode step also as ratios to
    # dense's, and their compression time as a ratio to their prefill
    assert [row.count("x |") for row in rows] == [3, 6, 6, 6, 6, 6]
    header = next(line for line in out.splitlines() if line.startswith("| tokens |")).split("|")
    column = [h.strip() for h in header].index("prefill density")
    density = {row.split("|")[2].strip(): float(row.split("|")[column]) for row in rows[1:]}
    assert density["dense"] == 1.0 and density["quest"] == 1.0  # prefill dense
    assert density["block_sparse"] == 1.0  # 19 key blocks of 16, top 64 kept: every one


def test_model_has_the_named_shape():
    model = scale.build_model("llama3.1-8b", 1, 1000, "meta", "bfloat16")
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (4096, 1024)
    assert model.model.layers[0].mlp.gate_proj.out_features == 14336
    assert len(model.model.layers) == 1 and model.config.vocab_size == 1000


def test_a_method_name_can_carry_prefill_settings(tmp_path):
    """`NAME:key=value,...` (perf.scale's way to set a method's density): the YAML's prefill
    section with those values, parsed as YAML scalars; refused on a method without one."""
    import pytest

    from sa_bench.perf.attention import method_config

    config = scale.with_prefill_settings("block_sparse:block=64,top_k=7", method_config, tmp_path)
    assert config["prefill"]["block"] == 64 and config["prefill"]["top_k"] == 7
    assert scale.with_prefill_settings("xattention:threshold=0.08", method_config,
                                       tmp_path)["prefill"]["threshold"] == 0.08
    assert scale.with_prefill_settings("xattention", method_config, tmp_path)["prefill"]["threshold"] == 0.9
    with pytest.raises(SystemExit, match="NAME:key=value"):
        scale.with_prefill_settings("quest:heavy_size=0.1", method_config, tmp_path)


def test_scale_command_times_kvzip_with_its_reconstruction_passes(capsys):
    """KVzip on a random-weight model (no tokenizer: the byte-level one): its row has the KV
    kept at the ratio over all layers and a compression time (its passes) above zero."""
    scale.main(["--shape", "tiny", "--tokens", "300", "--methods", "dense", "kvzip", "--ratio", "0.75",
                "--question", "8", "--new", "2"])
    out = capsys.readouterr().out
    assert "failed" not in out
    header = [h.strip() for h in next(line for line in out.splitlines() if line.startswith("| tokens |")).split("|")]
    row = next(line for line in out.splitlines() if line.startswith("| 300 | kvzip |")).split("|")
    assert float(row[header.index("compression s")]) > 0
    assert 0.25 <= float(row[header.index("KV kept")]) < 0.4  # head-wise: the largest head's length
