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
