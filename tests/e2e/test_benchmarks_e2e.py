"""Every benchmark end to end through the job runner, on its fixtures, with the embedded model."""

import json

import pytest
from omegaconf import OmegaConf

from sa_bench.launch.pool import Lease
from sa_bench.runner import evaluate
from sa_bench.spec import JobSpec
from tests.conftest import FIXTURES, ROOT, run_sa_bench


def conf(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml"))


CASES = [
    ("passkey", "1k", None, {"n_samples": 2}),
    ("niah", "1k", None, {"depths": [0, 50, 100], "samples_per_depth": 1}),
    ("ruler", "niah_multikey_1", None, {"length": 600}),
    ("ruler", "vt", None, {"length": 2000}),
    ("ruler", "qa_1", "ruler", {"length": 800}),
    ("longbench", "hotpotqa", "longbench", {}),
    ("longbench", "trec", "longbench", {}),
    ("longbench", "multifieldqa_zh", "longbench", {}),
    ("longbench_e", "hotpotqa", "longbench", {}),
    ("longbench_v2", "all", "longbench_v2", {}),
    ("infinitebench", "kv_retrieval", "infinitebench", {}),
    ("infinitebench", "longbook_choice_eng", "infinitebench", {}),
    ("infinitebench", "longbook_sum_eng", "infinitebench", {}),
    ("infinitebench", "longbook_qa_chn", "infinitebench", {}),
    ("infinitebench", "math_calc", "infinitebench", {}),
    ("loogle", "shortdep_cloze", "loogle", {}),
    ("loogle", "shortdep_qa", "loogle", {}),
    ("loogle", "longdep_summarization", "loogle", {}),
    ("aime24", "all", "aime", {}),
    ("zero_scrolls", "qasper", "zero_scrolls", {}),
    ("loft", "quest_32k", "loft", {}),
]


@pytest.mark.parametrize("bench, subset, fixtures, extra", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_benchmark_runs_through_the_runner(tmp_path, bench, subset, fixtures, extra):
    benchmark = {**conf("benchmark", bench), "subset": subset, "max_samples": 2, **extra}
    if fixtures:
        benchmark["data_dir"] = str(FIXTURES / fixtures)
    cfg = {"model": conf("model", "tiny"), "sparse": conf("sparse", "dense"),
           "benchmark": benchmark, "pool": {"devices": "cpu"}, "seed": 0,
           "max_new_tokens": 6, "overwrite": False, "plan": False, "output_root": str(tmp_path)}
    spec = JobSpec.from_dict(cfg)
    summary = evaluate(spec, tmp_path, Lease(devices=[], simulated=False))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["score"] == metrics["score"] and 0 <= metrics["score"] <= 100
    records = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(records) == stats["n_samples"] >= 1
    assert all(len(r["prediction"]) >= 0 and r["prompt_tokens"] <= 8192 for r in records)
    assert stats["truncated_samples"] == sum(r["truncated"] for r in records)


def test_local_data_through_the_command_line(tmp_path):
    """benchmark.data_dir points at local files; the data location is not part of the key."""
    args = ["benchmark=longbench", "benchmark.subsets=[hotpotqa]", "benchmark.max_samples=2",
            "max_new_tokens=4"]
    first = run_sa_bench(*args, f"benchmark.data_dir={FIXTURES / 'longbench'}", root=tmp_path / "out",
                         check=True)
    assert "1 jobs: 0 done (skipped), 1 to run" in first.stdout
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for file in (FIXTURES / "longbench").iterdir():  # the same files (all are fingerprinted)
        (copy / file.name).write_bytes(file.read_bytes())
    moved = run_sa_bench(*args, f"benchmark.data_dir={copy}", root=tmp_path / "out", check=True)
    assert "1 jobs: 1 done (skipped), 0 to run" in moved.stdout


@pytest.mark.parametrize("bench, subset", [("zero_scrolls", "qasper"), ("loft", "nq_32k")])
def test_new_benchmark_cell_through_the_command_line(tmp_path, bench, subset):
    """One offline cell on the embedded model from the small local fixture."""
    run_sa_bench(f"benchmark={bench}", f"benchmark.subsets=[{subset}]",
                 f"benchmark.data_dir={FIXTURES / bench}", "benchmark.max_samples=2",
                 "max_new_tokens=4", root=tmp_path / "out", check=True)
    [metrics_file] = (tmp_path / "out").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["n"] == 2 and 0 <= metrics["score"] <= 100
    assert (metrics_file.parent / "done.json").is_file()


def test_missing_local_data_names_the_files(tmp_path):
    proc = run_sa_bench("benchmark=longbench", "benchmark.subsets=[qasper]",
                        f"benchmark.data_dir={tmp_path / 'nothing'}", root=tmp_path / "out")
    assert proc.returncode == 1
    assert "qasper" in proc.stdout and str(tmp_path / "nothing") in proc.stdout


def test_a_torn_data_line_is_named_before_the_model_loads(tmp_path, monkeypatch):
    """The data is read with the tokenizer alone: a bad line stops the job before the weights
    load (which takes minutes for an 8B model)."""
    import shutil

    from sa_bench.benchmarks.data import BadRowError
    from sa_bench.models import loading

    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "longbench", data)
    lines = (data / "hotpotqa.jsonl").read_text().splitlines()
    lines.insert(1, '{"input": "a", "cont')
    (data / "hotpotqa.jsonl").write_text("\n".join(lines) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    benchmark = {**conf("benchmark", "longbench"), "subset": "hotpotqa", "data_dir": str(data)}
    cfg = {"model": conf("model", "tiny"), "sparse": conf("sparse", "dense"),
           "benchmark": benchmark, "pool": {"devices": "cpu"}, "seed": 0,
           "max_new_tokens": 6, "overwrite": False, "plan": False, "output_root": str(tmp_path)}
    with pytest.raises(BadRowError, match=r"hotpotqa.jsonl: line 2"):
        evaluate(JobSpec.from_dict(cfg), tmp_path / "out", Lease(devices=[], simulated=False))
