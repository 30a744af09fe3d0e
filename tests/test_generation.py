"""Generation settings of the benchmark config: each benchmark's official value by default,
applied at every greedy step exactly as transformers applies them, part of the job key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import RepetitionPenaltyLogitsProcessor

from sa_bench.benchmarks.base import Benchmark, Generation, next_token
from sa_bench.config import ConfigError, build_target

ROOT = Path(__file__).resolve().parents[1]


def bench_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "benchmark" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0, 0.7])
def test_next_token_equals_transformers_repetition_penalty(penalty):
    gen = torch.Generator().manual_seed(int(penalty * 10))
    for _ in range(20):
        logits = torch.randn(50, generator=gen) * 3  # negative and positive logits
        prompt = torch.randint(0, 50, (30,), generator=gen).tolist()  # with repeats
        answer = torch.randint(0, 50, (5,), generator=gen).tolist()
        seen = torch.tensor([prompt + answer])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits[None].clone())
        for pieces in ((prompt, answer), (tuple(prompt), [], answer)):  # a tuple is cached
            ours = next_token(logits, Generation(repetition_penalty=penalty), *pieces)
            assert ours == int(expected[0].argmax())


def test_next_token_penalty_changes_the_choice_and_keeps_the_input():
    logits = torch.tensor([4.0, 3.0, -1.0, -1.5])
    assert next_token(logits, Generation()) == 0
    assert next_token(logits, Generation(repetition_penalty=2.0), [0]) == 1  # 4/2 < 3
    assert next_token(logits[2:], Generation(repetition_penalty=2.0), [0]) == 1  # -2 < -1.5
    assert logits.tolist() == [4.0, 3.0, -1.0, -1.5]
    bf16 = logits.to(torch.bfloat16)
    assert next_token(bf16, Generation(repetition_penalty=2.0), [0]) == 1  # as in float32
    assert next_token(bf16, Generation(repetition_penalty=2.0), [0], [1]) == 0  # 2.0 > 1.5


def test_runner_decoding_with_penalty_equals_generate(install):
    """The runner's cached greedy decoding under LooGLE's penalty equals transformers'
    `generate(repetition_penalty=2.0)` over the whole prompt."""
    from sa_bench.attention import SparseMethod
    from sa_bench.models.loading import ModelConfig, load_model
    from sa_bench.runner import _answer, _prefill, _rewind

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"), [])
    method = SparseMethod.from_config(
        OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/dense.yaml"))
    )
    install(method, model)
    context = tok("x the pass key is #31415. and more words here and there " * 4).input_ids
    question = tok(" The pass key is #", add_special_tokens=False).input_ids
    cache, ctx_len, _ = _prefill(model, method, tuple(context), torch.device("cpu"))
    full = torch.tensor([context + question])
    outputs = {}
    for penalty in (1.0, 2.0):
        outputs[penalty] = _answer(model, method, cache, question, 10, set(), torch.device("cpu"),
                                   Generation(repetition_penalty=penalty), context)
        _rewind(cache, ctx_len)
        ref = model.generate(full, attention_mask=torch.ones_like(full), do_sample=False,
                             repetition_penalty=penalty, max_new_tokens=10, min_new_tokens=10)
        assert outputs[penalty] == ref[0, full.shape[1]:].tolist()
    assert outputs[1.0] != outputs[2.0]  # the penalty acts on this prompt


def test_official_defaults_per_benchmark():
    for path in sorted((ROOT / "conf" / "benchmark").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        expected = 2.0 if path.stem == "loogle" else 1.0
        assert data["generation"] == {"repetition_penalty": expected}, path.name
        data["subset"] = data["subsets"][0]
        assert build_target(data, "benchmark", Benchmark).generation.repetition_penalty == expected
    # the class default too, when a YAML leaves the key out
    data = {k: v for k, v in bench_yaml("loogle").items() if k != "generation"}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(2.0)
    data = {k: v for k, v in bench_yaml("longbench").items() if k != "generation"}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(1.0)


def test_bad_generation_settings_name_the_key():
    data = {**bench_yaml("loogle"), "generation": {"repetition_penalty": 0}}
    with pytest.raises(ConfigError, match="repetition_penalty: expected a value > 0"):
        build_target(data, "benchmark", Benchmark)
    data = {**bench_yaml("loogle"), "generation": {"temperature": 0.5}}
    with pytest.raises(ConfigError, match=r"benchmark\.generation\.temperature: unknown key"):
        build_target(data, "benchmark", Benchmark)


def test_repetition_penalty_is_part_of_the_job_key():
    from sa_bench.launch.identity import job_key
    from sa_bench.spec import JobSpec

    def conf(group: str, name: str) -> dict:
        return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())

    def key(penalty: float) -> str:
        benchmark = {**conf("benchmark", "loogle"), "subset": "shortdep_qa",
                     "generation": {"repetition_penalty": penalty}}
        cfg = {"model": conf("model", "tiny"), "sparse": conf("sparse", "dense"),
               "benchmark": benchmark, "pool": {"devices": "cpu"}, "seed": 0,
               "max_new_tokens": None, "overwrite": False, "plan": False, "output_root": "out"}
        return job_key(JobSpec.from_dict(cfg))

    assert key(2.0) == key(2.0)
    assert len({key(1.0), key(2.0), key(1.5)}) == 3
