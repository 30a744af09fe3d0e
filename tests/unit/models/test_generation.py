"""Generation settings of the benchmark config: each benchmark's official value by default,
applied at every greedy step exactly as transformers applies them, part of the job key."""

from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from sa_bench.benchmarks.base import Benchmark, Generation, next_token
from sa_bench.config import ConfigError, build_target
from tests.conftest import ROOT


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
        assert data["generation"] == {"repetition_penalty": expected, "stop_on_newline": None,
                                      "min_new_tokens": None}, path.name
        for subset in data["subsets"]:  # null: the subset's official value, set when built
            samsum = subset == "samsum"  # LongBench (and -E) pred.py, samsum only
            generation = build_target({**data, "subset": subset}, "benchmark", Benchmark).generation
            assert generation == Generation(expected, stop_on_newline=samsum,
                                            min_new_tokens=int(samsum)), (path.name, subset)
    # the class default too, when a YAML leaves the key out
    data = {k: v for k, v in bench_yaml("loogle").items() if k != "generation"}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(2.0)
    data = {k: v for k, v in bench_yaml("longbench").items() if k != "generation"}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(1.0)


def test_bad_generation_settings_name_the_key():
    data = {**bench_yaml("loogle"), "generation": {"repetition_penalty": 0}}
    with pytest.raises(ConfigError, match=r"^benchmark\.generation\.repetition_penalty: expected a value > 0"):
        build_target(data, "benchmark", Benchmark)
    data = {**bench_yaml("loogle"), "generation": {"temperature": 0.5}}
    with pytest.raises(ConfigError, match=r"benchmark\.generation\.temperature: unknown key"):
        build_target(data, "benchmark", Benchmark)
    data = {**bench_yaml("longbench"), "generation": {"min_new_tokens": -1}}
    with pytest.raises(ConfigError, match=r"^benchmark\.generation\.min_new_tokens: expected an int >= 0"):
        build_target(data, "benchmark", Benchmark)
    data = {**bench_yaml("longbench"), "generation": {"stop_on_newline": "yes"}}
    with pytest.raises(ConfigError, match=r"benchmark\.generation\.stop_on_newline"):
        build_target(data, "benchmark", Benchmark)


def test_a_value_set_in_the_config_wins_over_the_official_one():
    data = {**bench_yaml("longbench"), "subset": "samsum",
            "generation": {"stop_on_newline": False, "min_new_tokens": 0}}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(1.0, False, 0)
    data = {**data, "subset": "hotpotqa", "generation": {"stop_on_newline": True}}
    assert build_target(data, "benchmark", Benchmark).generation == Generation(1.0, True, 0)


@pytest.mark.parametrize("min_new", [0, 1, 3])
def test_next_token_bans_stop_ids_like_transformers_min_new_tokens(min_new):
    gen = torch.Generator().manual_seed(min_new)
    stop = [3, 7]
    for n_new in range(5):
        logits = torch.randn(10, generator=gen)
        logits[7] = 10.0  # a stop id is the greedy choice
        seen = torch.zeros(1, 4 + n_new, dtype=torch.long)  # a prompt of 4 tokens, n_new new
        expected = MinNewTokensLengthLogitsProcessor(4, min_new, stop)(seen, logits[None].clone())
        ours = next_token(logits, Generation(min_new_tokens=min_new), stop=set(stop), n_new=n_new)
        assert ours == int(expected[0].argmax())
        assert (ours == 7) == (n_new >= min_new)
    assert logits[7] == 10.0  # the caller's logits are left as they were


def test_stop_ids_the_newline_as_longbench_finds_it():
    from sa_bench.models.loading import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"))
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and tok.decode(newline) == "\n"
    assert Generation(stop_on_newline=True).stop_ids(tok) == set(newline)
    assert Generation(stop_on_newline=False).stop_ids(tok) == set() == Generation().stop_ids(tok)


SAMSUM_ROWS = [  # found by search: the tiny model's greedy answer starts with a newline ...
    {"context": "pass a A:\n.five\nSummary: the\norange ", "input": "\n\n\nis\n.isfive\n"},
    # ... and here it writes a newline after 13 tokens
    {"context": ".\nx\n\n\n\n\n#1\nx\nfiveand ais.\nx five   is Dialogue:\n  fivex\nDialogue: is"
                "\nxfive\na\npass\nfive \n\n\n", "input": ".\n\n\n passxB:\nfive\n. and\ndigits "},
]


def test_samsum_decoding_equals_generate_with_newline_stop(tmp_path):
    """A LongBench samsum job decodes as the official pred.py: `generate(eos_token_id=[eos,
    newline], min_length=context_length+1)`, i.e. min_new_tokens=1; other settings differ."""
    import json

    from sa_bench.launch.pool import Lease
    from sa_bench.models.loading import load_model
    from sa_bench.models.prompting import build_request
    from sa_bench.runner import evaluate
    from sa_bench.spec import JobSpec

    data = tmp_path / "data"
    data.mkdir()
    rows = [{**r, "answers": ["a"], "length": 9, "all_classes": None, "_id": f"s{i}"}
            for i, r in enumerate(SAMSUM_ROWS)]
    (data / "samsum.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(generation: dict) -> tuple[list[str], JobSpec]:
        benchmark = {**bench_yaml("longbench"), "subset": "samsum", "data_dir": str(data),
                     "generation": {**bench_yaml("longbench")["generation"], **generation}}
        cfg = {"model": yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text()),
               "sparse": yaml.safe_load((ROOT / "conf/sparse/dense.yaml").read_text()),
               "benchmark": benchmark, "pool": {"devices": "cpu"}, "seed": 0,
               "max_new_tokens": 20, "overwrite": False, "plan": False, "output_root": "out"}
        spec = JobSpec.from_dict(cfg)
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        evaluate(spec, out, Lease(devices=[], simulated=False))
        lines = (out / "predictions.jsonl").read_text().splitlines()
        return [json.loads(x)["prediction"] for x in lines], spec

    official, spec = run({})
    assert spec.benchmark.generation == Generation(1.0, stop_on_newline=True, min_new_tokens=1)
    plain, _ = run({"stop_on_newline": False, "min_new_tokens": 0})

    torch.manual_seed(0)
    model, tok = load_model(spec.model, [])
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    stops = [tok.eos_token_id, newline]
    for sample, ours, other in zip(spec.benchmark.load(tok), official, plain, strict=True):
        request = build_request(sample, tok, False, 8192 - 20)
        full = torch.tensor([request.context_ids + request.question_ids])
        ref = model.generate(full, attention_mask=torch.ones_like(full), do_sample=False,
                             max_new_tokens=20, eos_token_id=stops, min_new_tokens=1)
        new = ref[0, full.shape[1]:].tolist()
        new = new[: min((new.index(s) for s in stops if s in new), default=len(new))]
        assert ours == tok.decode(new, skip_special_tokens=True) and ours != other
    assert plain[0].startswith("\n") and official[0] and "\n" not in official[0]  # min_new_tokens
    assert "\n" in plain[1] and plain[1].startswith(official[1])  # the newline stop


def spec_of(benchmark: str, subset: str, **overrides):
    from sa_bench.spec import JobSpec

    def conf(group: str, name: str) -> dict:
        return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())

    cfg = {"model": conf("model", "tiny"), "sparse": conf("sparse", "dense"),
           "benchmark": {**conf("benchmark", benchmark), "subset": subset, **overrides},
           "pool": {"devices": "cpu"}, "seed": 0, "max_new_tokens": None, "overwrite": False,
           "plan": False, "output_root": "out"}
    return JobSpec.from_dict(cfg)


def job_key(spec) -> str:
    from sa_bench.fingerprint import FingerprintCache
    from sa_bench.launch.identity import Inputs
    from sa_bench.launch.identity import job_key as key_of

    return key_of(spec, Inputs("cpu", False, FingerprintCache()))


def test_repetition_penalty_is_part_of_the_job_key():
    def key(penalty: float) -> str:
        return job_key(spec_of("loogle", "shortdep_qa", generation={"repetition_penalty": penalty}))

    assert key(2.0) == key(2.0)
    assert len({key(1.0), key(2.0), key(1.5)}) == 3


def test_new_settings_change_the_key_only_where_they_change_the_result():
    """key_defaults.json records the behaviour from before these settings (no newline stop,
    no minimum, InfiniteBench with the chat template): cells decoded as before keep their
    keys, samsum and InfiniteBench cells (decoded differently now) get new ones."""
    from sa_bench.launch.identity import NON_RESULT_FIELDS, canonical

    def bench_key(spec) -> dict:
        return canonical(spec.benchmark, drop=NON_RESULT_FIELDS["benchmark"])

    off = {"stop_on_newline": False, "min_new_tokens": 0}
    assert bench_key(spec_of("longbench", "hotpotqa")) == {
        "@": "LongBench", "name": "longbench", "subset": "hotpotqa"}  # as before
    assert bench_key(spec_of("longbench", "samsum"))["generation"] == {
        "@": "Generation", "stop_on_newline": True, "min_new_tokens": 1}
    assert "generation" not in bench_key(spec_of("longbench_e", "samsum", generation=off))
    assert job_key(spec_of("longbench", "samsum")) != job_key(spec_of("longbench", "samsum",
                                                                      generation=off))
    assert job_key(spec_of("longbench", "qasper")) == job_key(spec_of("longbench", "qasper",
                                                                      generation=off))
    assert bench_key(spec_of("infinitebench", "passkey"))["chat_template"] is False
    assert "chat_template" not in bench_key(spec_of("infinitebench", "passkey", chat_template=True))
