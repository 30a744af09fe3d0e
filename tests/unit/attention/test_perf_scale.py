"""The scale perf command runs the job's path and the plain loop and prints one row each
(figures themselves are not asserted: they come from the command, not from tests)."""

import pytest

from sa_bench.attention.compression import TILE
from sa_bench.perf import scale


def test_scale_command_prints_every_method(capsys):
    scale.main(["--shape", "tiny", "--tokens", "300", "--methods", "dense", "streaming", "quest",
                "block_sparse", "--chunk", "128", "--question", "8", "--new", "3", "--per-kv-head"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 300 |")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "plain", "dense", "streaming", "quest", "block_sparse", "quest/kv"]  # only quest has a per_kv_head masker
    assert "failed" not in out
    # three ratios to plain; the methods' prefill attention, whole prefill and decode step also
    # as ratios to dense's, and their compression time as a ratio to their prefill
    # and the decode step's attention calls as a ratio to dense's
    assert [row.count("x |") for row in rows] == [3, 8, 8, 8, 8, 8]
    assert "ratio columns: CPU time of each process (1 thread)" in out  # --threads 1 on a CPU
    header = [h.strip() for h in
              next(line for line in out.splitlines() if line.startswith("| tokens |")).split("|")]
    cells = {row.split("|")[2].strip(): [c.strip() for c in row.split("|")] for row in rows}

    def col(name: str, method: str) -> float:
        return float(cells[method][header.index(name)])

    for method in cells:  # one thread: the process's CPU time is at most its wall time
        assert 0 <= col("prefill CPU s", method) <= col("prefill s", method) * 1.05 + 0.01  # 2 decimals
        assert col("decode ms/token", method) > 0  # timed over the decode steps alone
        if method != "plain":  # the step's attention calls: a part of the step
            assert 0 < col("decode attention ms/token", method) < col("decode ms/token", method)
    assert cells["dense"][header.index("prefill ratio to dense")] == "1.00x"
    density = {m: col("prefill density", m) for m in cells if m != "plain"}
    assert density["dense"] == 1.0 and density["quest"] == 1.0  # prefill dense
    assert density["block_sparse"] == 1.0  # 19 key blocks of 16, top 64 kept: every one


def test_ratios_are_of_cpu_time_on_one_cpu_thread(capsys):
    """A loaded machine stretches wall time, not a one-thread process's CPU time: on one CPU
    thread every time ratio divides CPU times, else wall times (the columns print both)."""
    def run(wall: float, cpu: float) -> dict:
        return {"prefill_s": 10 * wall, "prefill_cpu_s": 10 * cpu, "answer_s": wall,
                "answer_cpu_s": cpu, "decode_ms": 100 * wall, "decode_cpu_ms": 100 * cpu,
                "peak_bytes": 2**20, "prefill_attention_s": 4 * wall,
                "prefill_attention_cpu_s": 4 * cpu, "prefill_density": 0.1, "kv_kept": 1.0,
                "compress_s": wall, "compress_cpu_s": cpu, "decode_attention_ms": 10 * wall,
                "decode_attention_cpu_ms": 10 * cpu}

    dense, method = run(wall=1.0, cpu=1.0), run(wall=4.0, cpu=0.5)  # the method ran under load
    for cpu, expected in [(True, "0.50x"), (False, "4.00x")]:
        scale._print_row(100, "m", method, dense, dense, cpu)
        cells = [c.strip() for c in capsys.readouterr().out.split("|")]
        # prefill, answer (to plain); prefill attention, prefill, decode (to dense)
        # decode attention (to dense)
        assert [cells[i] for i in (5, 7, 14, 15, 17, 23)] == [expected] * 6
        assert cells[11] == "1.00x"  # peak memory: the same bytes
        assert cells[20] == "0.100x"  # compression over prefill, both of the same clock
    assert scale.cpu_clock(scale.argparse.Namespace(threads=1, device="cpu"))
    assert not scale.cpu_clock(scale.argparse.Namespace(threads=2, device="cpu"))
    assert not scale.cpu_clock(scale.argparse.Namespace(threads=1, device="cuda"))


def test_skip_plain_leaves_the_ratios_to_plain_out(capsys):
    scale.main(["--shape", "tiny", "--tokens", "200", "--methods", "dense", "--chunk", "0",
                "--question", "4", "--new", "2", "--skip-plain"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 200 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["dense"]
    cells = [c.strip() for c in rows[0].split("|")]
    assert cells[5] == "-" and cells[7] == "-" and cells[11] == "-"  # no plain loop to divide by


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
    # a press's ratio as perf.attention sets it: a decoding press's target size from the context
    assert scale.with_prefill_settings("knorm", method_config, tmp_path, 0.75, 1000)[
        "compression"]["compression_ratio"] == 0.75
    assert scale.with_prefill_settings("decoding", method_config, tmp_path, 0.75, 1000)[
        "compression"]["target_size"] == 250
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
    # head-wise: the kept keys over all layers, each head's segment padded to a tile (< TILE keys)
    assert 0.25 <= float(row[header.index("KV kept")]) < 0.25 + TILE / 300


def test_decode_time_is_timed_over_the_decode_steps_alone(monkeypatch):
    """A slow, varying question pass must not leak into decode ms/token (the old difference of
    a new-token and a one-token answer came out negative when the second question pass was
    slower): here the one-token answer's question pass takes 5 s more than the first's."""
    import types

    from sa_bench.perf import scale

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: now[0] / 2)
    monkeypatch.setattr(scale, "time", clock)
    import torch

    cpu = torch.device("cpu")
    start = scale.DecodeStart(cpu)
    question_s = iter([2.0, 7.0])

    def answer(n):
        now[0] += next(question_s)
        start()
        now[0] += 0.1 * (n - 1)  # 100 ms per decode step
        return [0] * n

    timed = scale._timed_answers(answer, lambda: None, cpu, 5, start)
    assert timed["decode_ms"] == pytest.approx(100.0)
    assert timed["decode_cpu_ms"] == pytest.approx(50.0)
    assert timed["answer_s"] == pytest.approx(2.4) and timed["question_s"] == pytest.approx(7.0)
